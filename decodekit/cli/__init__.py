"""The `decode` command line."""
