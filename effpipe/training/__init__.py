"""TODO: the training layer."""
