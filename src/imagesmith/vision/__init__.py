"""imagesmith.vision."""
