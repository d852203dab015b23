"""The project's error types: bad input, and a run stopped by a signal; and what
running out of device memory looks like.

Binaries turn a `UsageError` into one line on stderr and exit status 2, and a
`TrainingInterrupted` into one line saying how to resume and exit status 128 +
the signal number; any other exception is a bug and keeps its traceback.
`is_out_of_memory` is the one test, shared by the trainer (one line naming the
batch size and the tuner) and the batch-size tuner (a trial that does not fit).
No TensorFlow import: the binaries load this before TensorFlow.
"""

# Words of the errors that mean the device ran out of memory, lower-cased. TensorFlow
# raises ResourceExhaustedError for its own allocator, but XLA and the CUDA libraries
# report exhaustion through other types (InternalError, UnknownError) and words:
# XLA's "Out of memory while trying to allocate", the BFC allocator's "ran out of
# memory", CUDA's CUDA_ERROR_OUT_OF_MEMORY "failed to allocate", cuDNN's
# CUDNN_STATUS_ALLOC_FAILED and "Failed to get convolution algorithm. This is
# probably because cuDNN failed to initialize" (its workspace did not fit), and
# cuBLAS's CUBLAS_STATUS_ALLOC_FAILED.
OUT_OF_MEMORY_MARKERS = (
    "resource_exhausted",
    "resource exhausted",
    "out of memory",
    "oom when allocating",
    "failed to allocate",
    "alloc_failed",
    "failed to get convolution algorithm",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device (or the host, for a CPU run) ran out of memory.

    Args:
      error: an exception raised while building, compiling or running a model.

    Returns:
      True for TensorFlow's ResourceExhaustedError and for any error whose message
      holds one of OUT_OF_MEMORY_MARKERS (a Python MemoryError included).
    """
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
        return True
    text = str(error).lower()
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


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
