"""Append module search paths for third-party packages to sys.path."""

import sys

PREFIXES = [sys.prefix, sys.exec_prefix]
ENABLE_USER_SITE = None
