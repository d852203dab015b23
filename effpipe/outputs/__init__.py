"""TODO: the outputs layer."""
