"""Fault injection for the tests: SIGKILL at a named point of a run.

The tests that prove "a kill at any stage loses nothing" set KILL_ENV in the
environment of the binary they start; a run without it never stops here. The
process kills itself with SIGKILL, as the kernel's OOM killer or a scheduler would:
no handler, no `finally`, no flush runs.

Points (the value of KILL_ENV):
  epoch:N          at the start of epoch N (1-based, counted over both phases)
  feature_cache    in phase 1's feature-cache pass: the training images' features
                   computed, the validation images' not yet
  evaluation       in the final evaluation, after its first batch
  write:NAME       inside the atomic write of a file or folder whose name contains
                   NAME (checkpoint, state, plot, export...): the temporary written in
                   full, not yet renamed into place

No TensorFlow import: run_dir, which loads before TensorFlow, calls it.
"""

import os
import signal

KILL_ENV = "EFFPIPE_TEST_KILL_AT"


def kill_at(point: str) -> None:
    """SIGKILLs this process when KILL_ENV names `point`."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_during_write(path: str) -> None:
    """SIGKILLs this process when KILL_ENV is `write:NAME` and NAME is in the name of
    `path`, the file or folder being written."""
    value = os.environ.get(KILL_ENV, "")
    name = value.removeprefix("write:")
    if value.startswith("write:") and name and name in os.path.basename(os.path.abspath(path)):
        os.kill(os.getpid(), signal.SIGKILL)
