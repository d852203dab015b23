"""The recipe's model and step from a run's config, shared by the trainer, the
batch-size tuner and the benchmarks, so that all three build and compile the same
thing: the model (`make_configured_model`), the augmentation, and the compiled step
(`compile_model`).
"""

import keras

from effpipe.config import TrainConfig
from effpipe.model import augment, efficientnet


def make_configured_model(
    config: TrainConfig,
    source_size,
    num_classes: int,
    weights: str | None = None,
    random_weights: bool = False,
    synchronized_batch_norm: bool = False,
):
    """`efficientnet.make_model` with the run's flags (trainer, tuner and benchmarks).

    Args:
      config: the run configuration.
      source_size: (height, width) of the uint8 source images.
      num_classes: outputs of the classifier.
      weights: overrides `config.model.weights` (the benchmarks pass a local file).
      random_weights: the same model with a randomly initialised base (the
        batch-size tuner: no download, the same graph and memory).
      synchronized_batch_norm: the head's BatchNormalization computes its batch
        statistics over all replicas (several replicas), as one device would.

    Returns:
      The uncompiled model, base frozen.
    """
    return efficientnet.make_model(
        variant=config.model.variant,
        image_size=config.model.resolved_image_size,
        source_size=source_size,
        num_classes=num_classes,
        weights=config.model.weights if weights is None else weights,
        head=config.model.head,
        dropout=config.model.dropout,
        augment_config=augment_config(config),
        seed=config.seed,
        compile_augmentation=not config.runtime.debug_numerics,
        random_weights=random_weights,
        synchronized_batch_norm=synchronized_batch_norm,
    )


def augment_config(config: TrainConfig) -> augment.AugmentConfig | None:
    """The random transform of training batches from the run's flags.

    Args:
      config: the run configuration.

    Returns:
      The AugmentConfig of its augmentation flags, or None with --noaugment.
    """
    if not config.augmentation.augment:
        return None
    return augment.AugmentConfig(
        rotation_degrees=config.augmentation.rotation_degrees,
        shift_fraction=config.augmentation.shift_fraction,
        shear_degrees=config.augmentation.shear_degrees,
        zoom_fraction=config.augmentation.zoom_fraction,
        horizontal_flip=config.augmentation.horizontal_flip,
        fill_mode=config.augmentation.fill_mode,
    )


def describe_augmentation(config: TrainConfig) -> str:
    if not config.augmentation.augment:
        return "off"
    return (
        f"on the device: rotation +-{config.augmentation.rotation_degrees:g} deg, shift "
        f"+-{config.augmentation.shift_fraction:g}, shear +-{config.augmentation.shear_degrees:g} deg, zoom "
        f"+-{config.augmentation.zoom_fraction:g}, flip {'on' if config.augmentation.horizontal_flip else 'off'}, "
        f"fill {config.augmentation.fill_mode}"
    )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    *,
    jit_compile: bool,
    optimizer: keras.optimizers.Optimizer | None = None,
    steps_per_execution: int = 1,
) -> None:
    """Compiles for sparse integer labels; needed again after changing `trainable`.

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer.

    Args:
      model: the model to compile.
      learning_rate: Adam's learning rate.
      jit_compile: compile the train step with XLA.
      optimizer: use this optimizer instead of a new Adam (the phase-1 head model
        takes the full model's, so the resume state holds its variables).
      steps_per_execution: train steps per compiled call (see
        `resolve_steps_per_execution`).
    """
    num_classes = model.output_shape[-1]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate) if optimizer is None else optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
