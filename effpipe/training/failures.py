"""Failures of a step on the device, each turned into one line with its fix.

Running out of device memory names the batch size and the batch-size tuner; a
--debug_numerics finding names the op; in a multi-worker run a lost worker, and
with --data_service a restarted dispatcher, say how to resume (`WorkerLost`). Any
other error passes unchanged, traceback and all: it is a bug.
"""

import contextlib
import re

import tensorflow as tf

from effpipe import network
from effpipe.config import TrainConfig
from effpipe.errors import UsageError, WorkerLost, is_out_of_memory
from effpipe.training import runtime


@contextlib.contextmanager
def device_errors_as_usage_errors(
    config: TrainConfig, setup: runtime.Runtime, describe_kept_weights
):
    """Turns the failures of the module docstring into one line with the fix.

    Args:
      config: the run configuration, named in the fix.
      setup: the resolved runtime (device and precision).
      describe_kept_weights: () -> a sentence saying, at the time of the error, what
        checkpoint is kept.

    Raises:
      UsageError: for out-of-memory errors and --debug_numerics findings.
      WorkerLost: a lost worker, or a restarted data service dispatcher.
      Other errors pass unchanged.
    """
    try:
        yield
    except (tf.errors.OpError, MemoryError) as error:
        if not is_out_of_memory(error):
            _raise_numerics_finding(config, error, describe_kept_weights)
            _raise_if_worker_lost(config, error, describe_kept_weights)
            _raise_if_data_service_restarted(config, error, describe_kept_weights)
            raise
        raise UsageError(
            f"out of memory on {setup.device} at --batch_size={config.batch_size} "
            f"({config.model.variant} at {config.model.resolved_image_size} px, {setup.precision}): "
            f"find the largest batch that fits with `{runtime.tuner_command(config)}` (your card's "
            "memory in GB), or lower --batch_size. " + describe_kept_weights()
        ) from error


# How TensorFlow's collective ops report a worker that died or cannot be reached:
# the survivors' next all-reduce fails (within seconds of a SIGKILL, measured).
_WORKER_LOST_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)
_WORKER_LOST_MARKERS = (
    "Collective ops is aborted",
    "Connection reset by peer",
    "failed to connect",
)


def _raise_if_worker_lost(config: TrainConfig, error, describe_kept_weights) -> None:
    """In a multi-worker run, raises a collective op's failure as one WorkerLost line
    saying how to resume; returns otherwise."""
    text = str(error)
    if config.distribution.strategy != "multi_worker" or not (
        isinstance(error, _WORKER_LOST_ERRORS) or any(m in text for m in _WORKER_LOST_MARKERS)
    ):
        return
    # TensorFlow's message starts "Graph execution error:"; the cause is further down.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if any(m in line for m in _WORKER_LOST_MARKERS)]
    cause = (marked or lines or [type(error).__name__])[0]
    raise WorkerLost(
        f"another worker of the cluster stopped or cannot be reached ({cause}). "
        f"{describe_kept_weights()} Restart every worker with the same command: the run "
        "resumes from its last saved epoch."
    ) from error


def _raise_if_data_service_restarted(config: TrainConfig, error, describe_kept_weights) -> None:
    """Raises a step's failure after its tf.data service restarted (and lost the run's
    jobs) as one WorkerLost line saying how to resume; returns otherwise."""
    address = config.distribution.data_service
    restarted = address and network.dispatcher_restart_message(address, error)
    if restarted:
        raise WorkerLost(
            f"{restarted}. {describe_kept_weights()} Rerun the same command: the run resumes "
            "from its last saved epoch."
        ) from error


def _raise_numerics_finding(config: TrainConfig, error, describe_kept_weights) -> None:
    """Raises a --debug_numerics finding as one UsageError line; returns otherwise."""
    if not (
        config.runtime.debug_numerics
        and isinstance(error, tf.errors.InvalidArgumentError)
        and "Infinity or NaN" in str(error)
    ):
        return
    # The message names the checking node ("Detected at node X/CheckNumericsV2")
    # before a long stack; the op is X.
    node = re.search(r"Detected at node (\S+)", str(error))
    where = node.group(1).removesuffix("/CheckNumericsV2") if node else "an op"
    raise UsageError(
        f"--debug_numerics: the first NaN or infinity came out of {where}: lower the "
        "learning rate of that phase. " + describe_kept_weights()
    ) from error
