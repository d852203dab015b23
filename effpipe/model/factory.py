"""The recipe's model and step from a run's config, shared by the trainer, the
batch-size tuner and the benchmarks, so that all three build and compile the same
thing: the model (`make_configured_model`), the augmentation, and the compiled step
(`compile_model`).
"""

import keras

from effpipe.config import AugmentationConfig, ModelConfig
from effpipe.model import augment, efficientnet


def make_configured_model(
    model: ModelConfig,
    augmentation: AugmentationConfig,
    source_size,
    num_classes: int,
    *,
    seed: int,
    compile_augmentation: bool,
    weights: str | None = None,
    random_weights: bool = False,
    synchronized_batch_norm: bool = False,
):
    """`efficientnet.make_model` with the run's flags (trainer, tuner and benchmarks).

    Args:
      model: the run's model slice.
      augmentation: the run's augmentation slice.
      source_size: (height, width) of the uint8 source images.
      num_classes: outputs of the classifier.
      seed: keys the augmentation's random draws.
      compile_augmentation: compile the augmentation's sampling (off under
        --debug_numerics, whose checks XLA cannot run).
      weights: overrides `model.weights` (the benchmarks pass a local file).
      random_weights: the same model with a randomly initialised base (the
        batch-size tuner: no download, the same graph and memory).
      synchronized_batch_norm: the head's BatchNormalization computes its batch
        statistics over all replicas (several replicas), as one device would.

    Returns:
      The uncompiled model, base frozen.
    """
    return efficientnet.make_model(
        variant=model.variant,
        image_size=model.resolved_image_size,
        source_size=source_size,
        num_classes=num_classes,
        weights=model.weights if weights is None else weights,
        head=model.head,
        dropout=model.dropout,
        stochastic_depth=model.stochastic_depth,
        zero_init_residual=model.zero_init_residual,
        augment_config=augment_config(augmentation),
        seed=seed,
        compile_augmentation=compile_augmentation,
        random_weights=random_weights,
        synchronized_batch_norm=synchronized_batch_norm,
    )


def augment_config(augmentation: AugmentationConfig) -> augment.AugmentConfig | None:
    """The random transform of training batches from the augmentation slice.

    Returns:
      The AugmentConfig of its augmentation flags, or None with --noaugment.
    """
    if not augmentation.augment:
        return None
    return augment.AugmentConfig(
        rotation_degrees=augmentation.rotation_degrees,
        shift_fraction=augmentation.shift_fraction,
        shear_degrees=augmentation.shear_degrees,
        zoom_fraction=augmentation.zoom_fraction,
        horizontal_flip=augmentation.horizontal_flip,
        fill_mode=augmentation.fill_mode,
    )


def describe_augmentation(augmentation: AugmentationConfig) -> str:
    """The augmentation in words, for the log."""
    if not augmentation.augment:
        return "off"
    return (
        f"on the device: rotation +-{augmentation.rotation_degrees:g} deg, shift "
        f"+-{augmentation.shift_fraction:g}, shear +-{augmentation.shear_degrees:g} deg, zoom "
        f"+-{augmentation.zoom_fraction:g}, flip {'on' if augmentation.horizontal_flip else 'off'}, "
        f"fill {augmentation.fill_mode}"
    )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    *,
    jit_compile: bool,
    optimizer: keras.optimizers.Optimizer | None = None,
    steps_per_execution: int = 1,
    label_smoothing: float = 0.0,
) -> None:
    """Compiles for sparse integer labels; needed again after changing `trainable`.

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer.

    Args:
      model: the model to compile.
      learning_rate: Adam's learning rate, when `optimizer` is None.
      jit_compile: compile the train step with XLA.
      optimizer: use this optimizer instead of a new Adam (the trainer's, of the
        run's kind and schedule; the phase-1 head model takes the full model's, so
        the resume state holds its variables).
      steps_per_execution: train steps per compiled call (see
        `effpipe.training.runtime.resolve_steps_per_execution`).
      label_smoothing: of the loss (`make_loss`); 0 for hard labels.
    """
    num_classes = model.output_shape[-1]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate) if optimizer is None else optimizer,
        loss=make_loss(num_classes, label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    # The optimizer's slots are made now, not inside the first train step: a
    # tf.function whose first trace creates variables is traced a second time
    # (TensorFlow's rule), which doubled the start of every fit on one device (Keras
    # builds them up front only under a distribution strategy). Under a strategy this
    # runs in its scope, so the slots are its mirrored variables.
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def make_loss(num_classes: int, label_smoothing: float = 0.0) -> keras.losses.Loss:
    """The cross-entropy of sparse integer labels, with label smoothing when asked.

    Keras' SparseCategoricalCrossentropy has no label smoothing; with smoothing the
    labels are one-hot encoded inside the loss for CategoricalCrossentropy, which
    has it. The datasets keep their int32 labels either way.
    """
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    return SmoothedSparseCrossentropy(num_classes, label_smoothing)


@keras.saving.register_keras_serializable(package="effpipe")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing on sparse integer labels.

    Args:
      num_classes: classes of the one-hot encoding.
      label_smoothing: the share of the target spread evenly over all classes.
    """

    def __init__(self, num_classes: int, label_smoothing: float, name="smoothed_crossentropy"):
        super().__init__(name=name)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        targets = keras.ops.one_hot(labels, self.num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            targets, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "label_smoothing": self.label_smoothing,
            "name": self.name,
        }
