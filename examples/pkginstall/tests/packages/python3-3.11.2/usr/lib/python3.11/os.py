"""OS routines for NT or Posix depending on what system we're on."""

import sys

name = "nt" if sys.platform == "win32" else "posix"
linesep = "\r\n" if name == "nt" else "\n"
