"""BatchNormalization statistics for a base trained from scratch.

A random base has no pretrained moving statistics, and those it accumulates while
training lag its weights; the calibration recomputes them from forward passes over
training images, once before training and again before every validation.
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

from effpipe.model import efficientnet


def calibrate_batch_norm(model: keras.Model, images, batch_size: int = 32) -> None:
    """Sets the base's BatchNormalization statistics to their average over `images`.

    For a base trained from scratch (`--weights=none`) only; pretrained bases are
    never recalibrated. A random base's BatchNormalization layers start with moving
    mean 0 and variance 1; frozen like that they let the signal shrink about 10x per
    stage (B0's top features measured ~1e-6), so phase 1 would train the head on
    zeros. While the base trains from scratch, its moving statistics (momentum 0.99)
    lag far behind the changing weights and validation swings (measured on the demo:
    0.36 then 0.19 validation accuracy in consecutive epochs, train rising steadily).
    Recomputing them before each validation ("precise BatchNorm") fixes both.

    Forward passes in training mode over `images` in batches, each with momentum 0
    so that a layer's moving statistics become that batch's statistics, averaged
    over the batches here; every layer's `trainable` flag and momentum are restored
    afterwards. The passes run as one compiled function per model, traced at the
    first calibration: eager passes cost seconds per calibration, and a from-scratch
    run calibrates before every validation.

    Args:
      model: a model built by `make_model`.
      images: (N, H, W, 3) uint8 source images; a few hundred is plenty.
      batch_size: images per forward pass (the training batch size fits).
    """
    base = efficientnet.get_base(model)
    trainable_flags = [(layer, layer.trainable) for layer in [base, *base.layers]]
    batch_norms = [
        layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in batch_norms]
    # Frozen BatchNormalization ignores training=True, so unfreeze for the passes;
    # the compiled passes were traced in this same state (trainable, momentum 0).
    base.trainable = True
    for layer in batch_norms:
        layer.momentum = 0.0
    forward = _calibration_pass(model)
    means = [np.zeros(layer.moving_mean.shape, np.float64) for layer in batch_norms]
    variances = [np.zeros(layer.moving_variance.shape, np.float64) for layer in batch_norms]
    starts = range(0, len(images), batch_size)
    for start in starts:
        forward(tf.convert_to_tensor(images[start : start + batch_size]))
        for index, layer in enumerate(batch_norms):
            means[index] += np.asarray(layer.moving_mean)
            variances[index] += np.asarray(layer.moving_variance)
    for layer, mean, variance, momentum in zip(batch_norms, means, variances, momenta):
        layer.moving_mean.assign((mean / len(starts)).astype(np.float32))
        layer.moving_variance.assign((variance / len(starts)).astype(np.float32))
        layer.momentum = momentum
    for layer, trainable in trainable_flags:
        layer.trainable = trainable


# One compiled calibration pass per model, kept while the model lives.
_CALIBRATION_PASSES = weakref.WeakKeyDictionary()


def _calibration_pass(model: keras.Model):
    """The model's resize + base in training mode, compiled once (any batch size)."""
    if model not in _CALIBRATION_PASSES:
        base, resize = efficientnet.get_base(model), model.get_layer("resize")
        source_shape = tuple(model.input.shape[1:])

        @tf.function(input_signature=[tf.TensorSpec((None, *source_shape), tf.uint8)])
        def forward(images):
            base(resize(images), training=True)

        _CALIBRATION_PASSES[model] = forward
    return _CALIBRATION_PASSES[model]


class BatchNormCalibration(keras.callbacks.Callback):
    """Recalibrates a from-scratch base's BatchNormalization before each validation.

    See `calibrate_batch_norm`. Validation, the best-checkpoint choice and the saved
    weights then all use statistics that match the current weights.

    Args:
      images: (N, H, W, 3) uint8 training images to compute the statistics on.
      batch_size: images per forward pass.
    """

    def __init__(self, images, batch_size: int):
        super().__init__()
        self.images = images
        self.batch_size = batch_size

    def on_test_begin(self, logs=None):
        calibrate_batch_norm(self.model, self.images, self.batch_size)
