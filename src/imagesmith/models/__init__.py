"""imagesmith.models."""
