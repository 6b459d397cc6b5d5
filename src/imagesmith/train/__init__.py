"""imagesmith.train."""
