"""TODO: the tune layer."""
