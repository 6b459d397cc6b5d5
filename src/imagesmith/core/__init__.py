"""imagesmith.core."""
