"""The project's error types: bad input, and a run stopped by a signal.

Binaries turn a `UsageError` into one line on stderr and exit status 2, and a
`TrainingInterrupted` into one line saying how to resume and exit status 128 +
the signal number; any other exception is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and the fix."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; the last epoch's state is saved.

    Attributes:
      signal_number: the signal that stopped the run.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
