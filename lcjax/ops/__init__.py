"""Pure functions holding the math: each op has a naive reference and fast variants behind ``impl=``."""
