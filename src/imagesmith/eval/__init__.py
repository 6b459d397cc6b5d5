"""imagesmith.eval."""
