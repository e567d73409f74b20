"""The version of deadstop, read by setuptools at build time and by `deadstop --version`."""

__version__ = "0.1.0"
