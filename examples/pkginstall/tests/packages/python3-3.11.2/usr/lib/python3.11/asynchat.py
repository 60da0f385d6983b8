"""A class supporting chat-style (command/response) protocols (deprecated)."""

DEPRECATED_IN = "3.6"
