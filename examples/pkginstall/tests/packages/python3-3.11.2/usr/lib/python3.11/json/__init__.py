"""JSON (JavaScript Object Notation) encoder and decoder."""

__version__ = "2.0.9"
