"""Shared utilities for the test suite (not part of the ntkcompile package)."""
