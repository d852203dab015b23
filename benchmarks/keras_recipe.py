"""The keras_recipe peer: what the keras-io fine-tuning guide has a user write today.

Benchmarks only: effpipe never trains with this. It is the strongest plain-Keras
way to fine-tune the same network on the same uint8 images, so that a comparison
measures effpipe's input path and step, not a weaker model:

  - data: a tf.data chain on the host, `from_tensor_slices` of the uint8 images ->
    shuffle -> repeat -> batch -> map(Keras RandomRotation, RandomTranslation,
    RandomZoom, RandomFlip, then Resizing to the model resolution;
    `num_parallel_calls=AUTOTUNE`) -> prefetch. Keras' random image layers run
    `ImageProjectiveTransformV3`, which has no XLA kernel: the guide maps them on
    the host, outside the compiled step, and so does this;
  - model: effpipe's own network from the base on (`make_model`): the same base,
    head and frozen layers, fed images at the model resolution instead of uint8
    source images, so only the input path and the step differ;
  - step: the trainer's compile (loss, metrics, Adam at the phase's learning rate)
    with the run's precision policy, XLA switch and steps per compiled call.

Where the guide's choices were open, the faster one is taken: augmentation maps
batches (one vectorised call per batch, not one per image), at source resolution,
before the resize. The ranges are effpipe's augmentation flags (rotation, shift,
zoom, flip, fill mode); its shear (0.2 degrees by default) has no counterpart in
the guide's layer list and is left out. The layers are built under the run's global
dtype policy, as a script that sets mixed precision first builds them, so under
mixed precision they compute and hand the model 16-bit images.
"""

import keras
import numpy as np
import tensorflow as tf

from effpipe.config import AugmentationConfig

# effpipe's model takes its input at this layer; the peer's model starts after it.
EFFPIPE_INPUT_LAYER = "resize"


def make_augmentation_layers(
    augmentation: AugmentationConfig, image_size: int, seed: int
) -> list[keras.layers.Layer]:
    """Keras' random image layers for effpipe's ranges, then the resize.

    Args:
      augmentation: effpipe's augmentation slice (its ranges; `augment` is ignored).
      image_size: the model resolution the last layer resizes to, in pixels.
      seed: seeds each layer's random draws.

    Returns:
      The layers, to be applied in order to a batch of images.
    """
    fill_mode = augmentation.fill_mode
    shift, zoom = augmentation.shift_fraction, augmentation.zoom_fraction
    layers = [
        # Keras' rotation factor is a fraction of a full turn.
        keras.layers.RandomRotation(
            augmentation.rotation_degrees / 360.0, fill_mode=fill_mode, seed=seed
        ),
        keras.layers.RandomTranslation(shift, shift, fill_mode=fill_mode, seed=seed + 1),
        # Height and width zoom drawn independently, as effpipe draws them.
        keras.layers.RandomZoom(zoom, zoom, fill_mode=fill_mode, seed=seed + 2),
    ]
    if augmentation.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 3))
    layers.append(keras.layers.Resizing(image_size, image_size))
    return layers


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    image_size: int,
    augmentation: AugmentationConfig,
    seed: int,
) -> tf.data.Dataset:
    """The guide's training stream: augmented batches at the model resolution, endless.

    Args:
      images: (N, H, W, 3) uint8 source images.
      labels: (N,) integer labels.
      batch_size: images per batch.
      image_size: the model resolution in pixels.
      augmentation: effpipe's augmentation slice (see `make_augmentation_layers`).
      seed: seeds the shuffle and the augmentation.

    Returns:
      A dataset of (images (B, S, S, 3) in the global policy's compute dtype,
      labels (B,) int32).
    """
    layers = make_augmentation_layers(augmentation, image_size, seed)

    def augment_and_resize(batch, batch_labels):
        for layer in layers:
            batch = layer(batch, training=True)
        return batch, batch_labels

    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    # Shuffle before repeat so each image is seen once per epoch.
    dataset = dataset.shuffle(len(labels), seed=seed).repeat()
    # drop_remainder gives static shapes, so a compiled step is traced once.
    dataset = dataset.batch(batch_size, drop_remainder=True)
    # After batch: Keras' layers transform a whole batch per call.
    dataset = dataset.map(augment_and_resize, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_model(network: keras.Model) -> keras.Model:
    """effpipe's network from the base on, sharing its layers and their trainable state.

    Args:
      network: a model built by `effpipe.model.efficientnet.make_model`, frozen or
        unfrozen for its phase, uncompiled.

    Returns:
      An uncompiled model of the same base and head, taking (S, S, 3) images at the
      model resolution in the compute dtype, as effpipe's base receives them.
    """
    resized = network.get_layer(EFFPIPE_INPUT_LAYER).output
    # Keras clones the graph from an intermediate tensor: a new input, the same layers.
    return keras.Model(resized, network.output, name="keras_recipe")
