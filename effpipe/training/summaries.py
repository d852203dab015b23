"""TensorBoard logs of a run, per phase, from Keras' own TensorBoard callback.

    WORKDIR/tensorboard/phase1/train/        epoch_loss, epoch_accuracy, epoch_top5,
                                             epoch_learning_rate (Keras), and
                                             epoch_images_per_sec, epoch_ms_per_step
                                             (the trainer's meter); a sample of
                                             augmented training images at the model
                                             resolution; a profiler trace with
                                             --profile_steps
    WORKDIR/tensorboard/phase1/validation/   epoch_loss, epoch_accuracy, epoch_top5
    WORKDIR/tensorboard/phase2/...           the same for phase 2

Epochs are numbered over both phases, so the two runs line up on one axis:
    tensorboard --logdir WORKDIR/tensorboard
"""

import os

import keras
import numpy as np
import tensorflow as tf

from effpipe.model import augment
from effpipe.training import callbacks

TENSORBOARD_DIR = "tensorboard"
# Training images drawn through the augmentation into each phase's log.
AUGMENTED_IMAGES = 8


def phase_log_dir(workdir: str, phase: int) -> str:
    return os.path.join(workdir, TENSORBOARD_DIR, f"phase{phase}")


def make_callbacks(
    workdir: str,
    phase: int,
    meter: callbacks.ThroughputMeter,
    model: keras.Model,
    sample_images: np.ndarray,
    profile_steps: tuple[int, int] | None,
) -> list[keras.callbacks.Callback]:
    """The TensorBoard callbacks of one phase's `fit`.

    Args:
      workdir: the run directory.
      phase: 1 or 2.
      meter: the run's ThroughputMeter, listed before these callbacks in `fit`.
      model: the full model (its `resize` layer draws the augmented images), also
        when phase 1 fits the head alone on cached features.
      sample_images: (N, S, S, 3) uint8 training images to show augmented.
      profile_steps: (first, last) train steps of the phase to trace, 1-based, or
        None.
    """
    log_dir = phase_log_dir(workdir, phase)
    return [
        keras.callbacks.TensorBoard(
            log_dir=log_dir,
            write_graph=False,
            profile_batch=profile_steps or 0,
        ),
        TrainingSummaries(os.path.join(log_dir, "train"), meter, model, sample_images),
    ]


class TrainingSummaries(keras.callbacks.Callback):
    """Adds the meter's images/s and ms/step per epoch, and augmented images.

    Args:
      log_dir: the phase's train log folder (Keras' TensorBoard writes there too).
      meter: the run's ThroughputMeter (its last record is this epoch's).
      full_model: the model whose `resize` layer draws the augmentation.
      sample_images: uint8 source images drawn through the augmentation once, when
        the phase starts.
    """

    def __init__(
        self,
        log_dir: str,
        meter: callbacks.ThroughputMeter,
        full_model: keras.Model,
        sample_images: np.ndarray,
    ):
        super().__init__()
        self.log_dir = log_dir
        self.meter = meter
        self.full_model = full_model
        self.sample_images = sample_images
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)
        views = augment.draw(self.full_model.get_layer("resize"), self.sample_images)
        with self._writer.as_default():
            tf.summary.image(
                "augmented_training_images",
                np.clip(views, 0, 255).astype(np.uint8),
                step=0,
                max_outputs=len(views),
                description="training images as the train step sees them: augmented "
                "(unless --noaugment) and resized to the model resolution",
            )

    def on_epoch_end(self, epoch, logs=None):
        record = self.meter.records[-1]
        with self._writer.as_default():
            tf.summary.scalar("epoch_images_per_sec", record["images_per_sec"], step=epoch)
            tf.summary.scalar("epoch_ms_per_step", record["ms_per_step"], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
