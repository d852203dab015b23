"""The best-weights checkpoint: atomic, and never written from a diverged epoch.

Keras' ModelCheckpoint writes the weights file in place, so a kill mid-write leaves
a truncated file that the final evaluation (or a later resume) would load, and it
saves an epoch whose loss became NaN if that epoch's validation metric still
improved. `BestCheckpoint` writes to a temporary name and renames
(`run_files.write_atomically`), and skips epochs whose training loss or monitored
metric is not finite.
"""

import math

import keras
from absl import logging

from effpipe import run_files


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights whenever the monitored validation metric improves.

    Args:
      path: the weights file (`.weights.h5`).
      monitor: the `fit` log to maximise.
      best: the best value so far (carried across phases); None for no threshold.
      model_to_save: the model whose weights are saved; by default the model being
        fit (phase 1 on cached features fits a head model and saves the full one).

    Attributes:
      best: the best monitored value seen, or None.
      saved: whether this callback has written the file.
    """

    def __init__(
        self,
        path: str,
        monitor: str = "val_accuracy",
        best: float | None = None,
        model_to_save=None,
    ):
        super().__init__()
        self.path = path
        self.model_to_save = model_to_save
        self.monitor = monitor
        self.best = best
        self.saved = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value, loss = logs.get(self.monitor), logs.get("loss")
        if value is None or loss is None or not (math.isfinite(value) and math.isfinite(loss)):
            return
        if self.best is not None and value <= self.best:
            return
        model = self.model_to_save or self.model
        run_files.write_atomically(self.path, model.save_weights)
        previous, self.best, self.saved = self.best, float(value), True
        logging.info(
            "epoch %d: %s %.4f (was %s): weights saved to %s",
            epoch + 1,
            self.monitor,
            value,
            "none" if previous is None else f"{previous:.4f}",
            self.path,
        )
