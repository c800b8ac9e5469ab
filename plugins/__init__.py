"""Built-in techniques."""
