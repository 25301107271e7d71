"""Seams into other libraries (transformers)."""
