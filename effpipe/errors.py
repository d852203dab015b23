"""The project's error types: bad input, a full disk, and a run stopped by a signal;
and what running out of device memory, or of disk space, looks like.

Binaries turn a `UsageError` into one line on stderr and exit status 2, and a
`TrainingInterrupted` into one line saying how to resume and exit status 128 +
the signal number; any other exception is a bug and keeps its traceback.
`is_out_of_memory` is the one test, shared by the trainer (one line naming the
batch size and the tuner) and the batch-size tuner (a trial that does not fit);
`is_disk_full` tells a full disk apart from it (TensorFlow reports both as
RESOURCE_EXHAUSTED).
No TensorFlow import: the binaries load this before TensorFlow.
"""

import errno

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


# How a full disk (or an exhausted quota) reads: Python's OSError carries the errno;
# h5py, TensorFlow's file writers and tf.data's write_file put the C library's words
# ("No space left on device", "Disk quota exceeded") or "errno = 28" in the message,
# and TensorFlow raises ResourceExhaustedError for them.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MARKERS = ("no space left on device", "disk quota exceeded", "errno = 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says a write found no space left (ENOSPC, or a quota: EDQUOT).

    Args:
      error: an exception raised while writing a file, directly or through h5py,
        NumPy or TensorFlow; the exceptions it was raised from are looked at too.

    Returns:
      True when it or an exception in its chain carries one of DISK_FULL_ERRNOS or
      DISK_FULL_MARKERS.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(error).lower() for marker in DISK_FULL_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device (or the host, for a CPU run) ran out of memory.

    Args:
      error: an exception raised while building, compiling or running a model.

    Returns:
      True for TensorFlow's ResourceExhaustedError and for any error whose message
      holds one of OUT_OF_MEMORY_MARKERS (a Python MemoryError included); False for
      a full disk (`is_disk_full`), which TensorFlow also reports as exhausted.
    """
    if is_disk_full(error):
        return False
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
        return True
    text = str(error).lower()
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and the fix."""


class DiskFullError(UsageError):
    """A write found the disk full: the message names the file, the space it needed
    and the space free, and says that what was there before is intact."""


class WorkerLost(Exception):
    """A process the run depends on stopped: another worker of a multi-worker run, or
    the tf.data service (restarted without the run's jobs). The message says what is
    saved and how to resume."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; the last epoch's state is saved.

    Attributes:
      signal_number: the signal that stopped the run.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
