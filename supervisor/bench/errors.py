"""The bench's usage error: a bad --target, --argv, --tool or a --plot without matplotlib (exit status 2)."""


class UsageError(Exception):
    """Said in one line by `deadstop bench` before anything is measured."""
