"""Built-in techniques, one package per family; see README.md for the rules."""
