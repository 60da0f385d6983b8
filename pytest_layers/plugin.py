"""pytest glue for pytest-layers (options, markers, fixtures, report hooks)."""
