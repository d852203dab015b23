"""The one step timer: per-epoch seconds, ms/step and images/s of training.

The trainer and the benchmarks share `ThroughputMeter`; there is no second timer.
Steady-state figures leave out each epoch's first step, which includes tracing
and compilation, as NVIDIA's EfficientNet benchmarks drop their warm-up.
"""

import time

import keras
from absl import logging


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
      ms_per_step: steady-state milliseconds per step (first step excluded when the
        epoch has more than one).
      images_per_sec: steady-state training images per second.

    Args:
      batch_size: images per step (the global batch).
      log_every_epoch: log one line per epoch through absl logging.
    """

    def __init__(self, batch_size: int, log_every_epoch: bool = True):
        super().__init__()
        self.batch_size = batch_size
        self.log_every_epoch = log_every_epoch
        self.records = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._first_step_end = None
        self._train_end = None
        self._last_logs = None
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._last_logs = logs
        if self._steps == 1:
            _wait_for(logs)
            self._first_step_end = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._mark_train_end()

    def on_epoch_end(self, epoch, logs=None):
        self._mark_train_end()
        seconds = self._train_end - self._epoch_start
        if self._steps > 1:
            steady_seconds = self._train_end - self._first_step_end
            steady_steps = self._steps - 1
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
            _wait_for(self._last_logs)
            self._train_end = time.perf_counter()
