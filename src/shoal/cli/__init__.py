"""The command-line interface: thin commands that parse, validate and call the library."""
