"""BatchNormalization statistics for a base trained from scratch.

A random base has no pretrained moving statistics, and those it accumulates while
training lag its weights; the calibration recomputes them from forward passes over
training images, once before training and again before every validation.
"""

import keras

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

    Forward passes in training mode over `images` in batches, with momentum set so
    each layer's moving statistics become the mean of its batch statistics; every
    layer's `trainable` flag and momentum are restored afterwards.

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
    # Frozen BatchNormalization ignores training=True, so unfreeze for the passes.
    base.trainable = True
    resize = model.get_layer("resize")
    for index, start in enumerate(range(0, len(images), batch_size)):
        # moving = momentum * moving + (1 - momentum) * batch: with momentum i/(i+1)
        # the moving value is the running mean of the first i+1 batches.
        for layer in batch_norms:
            layer.momentum = index / (index + 1)
        base(resize(images[start : start + batch_size]), training=True)
    for layer, momentum in zip(batch_norms, momenta):
        layer.momentum = momentum
    for layer, trainable in trainable_flags:
        layer.trainable = trainable


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
