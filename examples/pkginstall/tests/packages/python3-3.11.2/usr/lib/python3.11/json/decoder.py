"""Implementation of JSONDecoder."""

NaN = float("nan")
