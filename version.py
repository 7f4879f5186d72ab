"""The pack's version, kept in step with pyproject.toml (tests/test_packaging.py checks it)."""

__version__ = "0.1.0"
