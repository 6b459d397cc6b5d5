"""imagesmith.serve."""
