"""imagesmith.compose."""
