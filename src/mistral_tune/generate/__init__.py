"""Decoding: constrained decoding (constrain.py)."""
