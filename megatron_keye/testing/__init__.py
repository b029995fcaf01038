"""Test utilities shipped with the package: a gloo multi-process runner for parity checks."""
