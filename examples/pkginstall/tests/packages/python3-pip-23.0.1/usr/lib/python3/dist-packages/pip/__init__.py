"""The Python package installer."""

__version__ = "23.0.1"
