"""imagesmith.workflows."""
