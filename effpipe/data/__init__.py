"""TODO: the data layer."""
