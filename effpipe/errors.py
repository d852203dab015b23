"""The project's error type for bad input.

Binaries turn a `UsageError` into one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and the fix."""
