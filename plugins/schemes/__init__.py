"""Built-in parts of lowdose-toolkit."""
