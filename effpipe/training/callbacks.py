"""The trainer's own Keras callbacks: the step timer and the clean stop on a signal.

`ThroughputMeter` is the one step timer (per-epoch seconds, ms/step and images/s of
training); the trainer and the benchmarks share it, and there is no second timer.
Steady-state figures leave out each epoch's first compiled call (its first step, or
its first `steps_per_execution` steps), which includes tracing and compilation, as
NVIDIA's EfficientNet benchmarks drop their warm-up. `StopOnSignal` turns SIGINT and
SIGTERM into a stop at the next step; `keras_verbosity` picks Keras' progress display;
`KillPoints` is the tests' fault injection (effpipe.faults) at epochs and in evaluation.
"""

import os
import signal
import sys
import threading
import time

import keras
from absl import logging

from effpipe import faults
from effpipe.errors import TrainingInterrupted, UsageError
from effpipe.training import run_state


def keras_verbosity() -> int:
    """The `verbose` of `fit` and `predict`: a live progress bar on a terminal, one
    line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _wait_for(logs) -> None:
    """Blocks until the step that produced `logs` has finished on the device."""
    for value in (logs or {}).values():
        float(value)
        return


class ThroughputMeter(keras.callbacks.Callback):
    """Measures the training part of each epoch (validation excluded).

    After each epoch, `records[-1]` holds:
      seconds: wall time from the epoch's start to the end of its last train step.
      steps: train steps run.
      ms_per_step: steady-state milliseconds per step (the first compiled call
        excluded when the epoch has more than one).
      images_per_sec: steady-state training images per second.

    With Keras' `steps_per_execution` = N, `fit` calls back once per N steps, with
    the index of the call's last step: the first call (N steps, tracing and
    compilation included) is the one left out. The meter waits for the device only
    after the first call and at the end of the epoch's training, so it adds no
    round trip to the other steps; it is safe to call from Keras' asynchronous
    callback threads (`async_safe`) where a backend runs callbacks there.

    Args:
      batch_size: images per step (the global batch).
      log_every_epoch: log one line per epoch through absl logging.
    """

    async_safe = True

    def __init__(self, batch_size: int, log_every_epoch: bool = True):
        super().__init__()
        self.batch_size = batch_size
        self.log_every_epoch = log_every_epoch
        self.records = []
        # {"phaseN": seconds from the phase's start to the end of its first step}.
        self.first_step_seconds = {}
        self._phase = None
        self._lock = threading.Lock()

    def start_phase(self, phase: int) -> None:
        """Marks the start of `phase`: the end of its first compiled call (its first
        `steps_per_execution` steps) is logged and kept in `first_step_seconds`
        (compiling the model, building its inputs, tracing and XLA compilation
        included)."""
        self._phase = (phase, time.perf_counter())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._first_call_end = None
        self._first_call_steps = None
        self._train_end = None
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the call's last step: batch + 1 steps are done.
        with self._lock:
            first = self._first_call_steps is None
            if first:
                self._first_call_steps = batch + 1
            self._steps = max(self._steps, batch + 1)
        if first:
            _wait_for(logs)
            self._first_call_end = time.perf_counter()
            if self._phase is not None:
                phase, started = self._phase
                self._phase = None
                seconds = self._first_call_end - started
                self.first_step_seconds[f"phase{phase}"] = round(seconds, 1)
                logging.info(
                    "phase %d: first step done %.1f s after the phase's start", phase, seconds
                )

    def on_test_begin(self, logs=None):
        self._mark_train_end()

    def on_epoch_end(self, epoch, logs=None):
        self._mark_train_end()
        seconds = self._train_end - self._epoch_start
        steady_steps = self._steps - (self._first_call_steps or 0)
        if steady_steps > 0 and self._first_call_end is not None:
            steady_seconds = self._train_end - self._first_call_end
        else:
            steady_seconds, steady_steps = seconds, max(self._steps, 1)
        record = {
            "epoch": epoch + 1,
            "seconds": seconds,
            "steps": self._steps,
            "ms_per_step": 1000.0 * steady_seconds / steady_steps,
            "images_per_sec": steady_steps * self.batch_size / steady_seconds,
        }
        self.records.append(record)
        if self.log_every_epoch:
            logging.info(
                "epoch %d: %.1f s training, %.1f ms/step, %.1f images/s",
                record["epoch"],
                seconds,
                record["ms_per_step"],
                record["images_per_sec"],
            )

    def _mark_train_end(self):
        # Validation runs inside the epoch; only the first call per epoch counts.
        if self._train_end is None:
            # Reading the step counter waits for every update queued on the device.
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None:
                keras.ops.convert_to_numpy(optimizer.iterations)
            self._train_end = time.perf_counter()


class StopOnSignal(keras.callbacks.Callback):
    """SIGINT or SIGTERM: finish the current step, then raise TrainingInterrupted.

    Use as a context manager around all the training and evaluation work (the
    handlers are installed on entry and always restored on exit) and as a callback
    of every `fit`, `evaluate` and `predict` (it checks before each compiled call); call
    `check()` between phases. A second SIGINT falls back to KeyboardInterrupt.
    With `steps_per_execution` = N the current call's N steps finish first.

    Args:
      workdir: the run directory, named in the message.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir
        self.received = None
        self.epoch = None
        self._previous = {}

    def __enter__(self):
        self._previous = {number: signal.getsignal(number) for number in self.SIGNALS}
        for number in self.SIGNALS:
            signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False

    def _handle(self, number, frame):
        self.received = number
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    # Checked before each compiled call rather than after: Keras calls the begin
    # hooks without the step's results, so the check adds no wait for the device.
    def on_train_batch_begin(self, batch, logs=None):
        self.check()

    def on_test_batch_begin(self, batch, logs=None):
        # Validation is part of the epoch: stopping in it loses only that epoch.
        self.check()

    def on_predict_batch_begin(self, batch, logs=None):
        # Computing phase 1's cached features: nothing of them is saved yet.
        self.check()

    def check(self) -> None:
        """Raises TrainingInterrupted if a signal arrived."""
        if self.received is None:
            return
        name = signal.Signals(self.received).name
        try:
            state = run_state.load_state(self.workdir)
        except UsageError as error:  # Every saved state damaged: say so, still stop.
            saved = f"no intact state is saved ({error})"
        else:
            saved = (
                f"the state after epoch {state.epochs_done} is saved"
                if state
                else "no epoch had completed, so nothing is saved"
            )
        where = f" in epoch {self.epoch}" if self.epoch else ""
        raise TrainingInterrupted(
            f"stopped by {name}{where}; {saved} in "
            f"{os.path.join(self.workdir, run_state.STATE_DIR)}: rerun the same command to resume",
            self.received,
        )


class KillPoints(keras.callbacks.Callback):
    """The tests' SIGKILL points inside `fit` and `predict` (effpipe.faults): `epoch:N`
    at the start of epoch N, `evaluation` after the first batch of a prediction.
    Does nothing unless the environment names a point.

    Args:
      is_evaluation: whether this `predict` is the final evaluation (phase 1's
        feature-cache pass predicts too).
    """

    def __init__(self, is_evaluation: bool = False):
        super().__init__()
        self.is_evaluation = is_evaluation

    def on_epoch_begin(self, epoch, logs=None):
        faults.kill_at(f"epoch:{epoch + 1}")

    def on_predict_batch_end(self, batch, logs=None):
        if self.is_evaluation:
            faults.kill_at("evaluation")
