"""The original notebook's input pipeline and train step, rebuilt as a baseline.

Benchmarks only: effpipe never trains with this. It runs the notebook's code path
as the notebook ran it, on this process's TensorFlow and Keras, so a comparison
measures design, not library versions:

  - data: CIFAR-shaped uint8 arrays with one-hot labels (`to_categorical`), fed to
    `model.fit` as numpy arrays (what the notebook trained on) or through
    `ImageDataGenerator(...).flow` with the notebook's parameters (what it defined
    and never used);
  - model: Input(32, 32, 3) float32 -> Lambda(tf.image.resize to the model
    resolution) -> EfficientNet built on that tensor (`input_tensor=`) inside
    `with tf.device("/CPU:0")`, which keeps the base's variables in host memory
    (a likely part of the notebook's 730 ms/step on a GPU), frozen ->
    BatchNormalization -> Dropout(0.2) -> GlobalAveragePooling2D -> Dense softmax;
    categorical cross-entropy, Adam 1e-4, accuracy and top-k metrics; float32, no
    XLA (`jit_compile=False`);
  - phase 2: the model's last 51 layers, BatchNormalization excepted, unfrozen and
    recompiled with Adam 1e-5.

Where it must differ from the notebook (WORKSPACE.md says why):
  - Keras 3 instead of Keras 2 (`tf.keras` of TF 2.8): ImageDataGenerator comes from
    Keras 3's private legacy module, which keeps its code unchanged.
  - Random weights instead of ImageNet's (no download here); the compute is the same.
  - No validation split, checkpoint or Drive writes: only training steps are timed.
"""

import keras
import numpy as np
import tensorflow as tf
from keras.src.legacy.preprocessing.image import ImageDataGenerator

from effpipe import variants

# The notebook's `model.layers[-51:]` unfreezing rule and its ImageDataGenerator.
UNFROZEN_LAYERS = 51
GENERATOR_PARAMETERS = dict(
    rotation_range=40,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
)


def make_image_generator() -> ImageDataGenerator:
    """The notebook's ImageDataGenerator (its augmentation, defined but never used)."""
    return ImageDataGenerator(**GENERATOR_PARAMETERS)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The notebook's `to_categorical` labels."""
    return keras.utils.to_categorical(labels, num_classes)


def make_model(
    variant: str, image_size: int, num_classes: int, source_size: int = 32
) -> keras.Model:
    """The notebook's phase-1 model, compiled as it compiled it (random weights).

    Args:
      variant: a key of `variants.VARIANTS`.
      image_size: the resolution the Lambda layer resizes to, in pixels.
      num_classes: outputs of the softmax layer.
      source_size: side of the float32 input images in pixels.

    Returns:
      The compiled Keras model, base frozen.
    """
    inputs = keras.Input(shape=(source_size, source_size, 3))
    resized = keras.layers.Lambda(lambda image: tf.image.resize(image, (image_size, image_size)))(
        inputs
    )
    constructor = getattr(keras.applications, variants.VARIANTS[variant].keras_constructor)
    # The notebook built its base under this scope: the variables live on the host.
    with tf.device("/CPU:0"):
        base = constructor(input_tensor=resized, include_top=False, weights=None)
    base.trainable = False
    x = keras.layers.BatchNormalization()(base.output)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="notebook_replica")
    _compile(model, learning_rate=1e-4)
    return model


def unfreeze(model: keras.Model) -> None:
    """The notebook's phase 2: last 51 layers but BatchNormalization, Adam 1e-5."""
    for layer in model.layers[-UNFROZEN_LAYERS:]:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
    _compile(model, learning_rate=1e-5)


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        loss="categorical_crossentropy",
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        metrics=["accuracy", "top_k_categorical_accuracy"],
        jit_compile=False,
    )
