"""The best-weights checkpoint: atomic, and never written from a diverged epoch.

Keras' ModelCheckpoint writes the weights file in place, so a kill mid-write leaves
a truncated file that the final evaluation (or a later resume) would load, and it
saves an epoch whose loss became NaN if that epoch's validation metric still
improved. `BestCheckpoint` writes to a temporary name and renames
(`run_dir.write_atomically`), and skips epochs whose training loss or monitored
metric is not finite.

In a training run the best weights first go to the resume state's folder
(`staging_dir`), under a name the epoch's state.json then records; only after that
does `publish()` copy them to checkpoints/best.weights.h5. A kill between the two
leaves the published file and the state agreeing on the previous best, or the state
ahead, which a resumed run publishes again (`run_state.publish_best`): the published
checkpoint is never from an epoch the run's history does not hold.
"""

import math
import os
import shutil

import keras
from absl import logging

from effpipe import run_dir

# The published best weights, under the run directory.
BEST_CHECKPOINT = os.path.join("checkpoints", "best.weights.h5")


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights whenever the monitored validation metric improves.

    Args:
      path: the weights file (`.weights.h5`).
      monitor: the `fit` log to maximise.
      best: the best value so far (carried across phases); None for no threshold.
      model_to_save: the model whose weights are saved; by default the model being
        fit (phase 1 on cached features fits a head model and saves the full one).
      staging_dir: write improvements here as best-epoch-NNNN.weights.h5, and to
        `path` only on `publish()`; None writes `path` directly.
      staged_file: the file in `staging_dir` already holding the best weights
        (carried across phases and resumes), or None.

    Attributes:
      best: the best monitored value seen, or None.
      saved: whether this callback has written (or staged) weights.
      staged_file: the staged file of the best weights so far, or None.
    """

    def __init__(
        self,
        path: str,
        monitor: str = "val_accuracy",
        best: float | None = None,
        model_to_save=None,
        staging_dir: str | None = None,
        staged_file: str | None = None,
    ):
        super().__init__()
        self.path = path
        self.model_to_save = model_to_save
        self.staging_dir = staging_dir
        self.staged_file = staged_file
        self._published_file = staged_file
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
        if self.staging_dir is None:
            run_dir.write_atomically(self.path, model.save_weights)
        else:
            self.staged_file = f"best-epoch-{epoch + 1:04d}.weights.h5"
            run_dir.write_atomically(
                os.path.join(self.staging_dir, self.staged_file), model.save_weights
            )
        previous, self.best, self.saved = self.best, float(value), True
        logging.info(
            "epoch %d: %s %.4f (was %s): best weights saved to %s",
            epoch + 1,
            self.monitor,
            value,
            "none" if previous is None else f"{previous:.4f}",
            self.path,
        )

    def publish(self) -> None:
        """Copies the staged best weights to `path` (atomically), if not done yet."""
        if self.staged_file is None or self.staged_file == self._published_file:
            return
        publish_staged(os.path.join(self.staging_dir, self.staged_file), self.path)
        self._published_file = self.staged_file


def publish_staged(staged_path: str, path: str) -> None:
    """Copies a staged weights file to the published checkpoint path, atomically."""
    run_dir.write_atomically(path, lambda temporary: shutil.copyfile(staged_path, temporary))
