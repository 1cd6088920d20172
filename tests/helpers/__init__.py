"""Scripts and utilities that tests launch or import."""
