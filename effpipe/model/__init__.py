"""TODO: the model layer."""
