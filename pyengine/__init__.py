"""pyengine."""
