"""imagesmith.engine."""
