"""The recipe's model and step from a run's flags, shared by the trainer, the
batch-size tuner and the benchmarks, so that all three build and compile the same
thing: the model (`make_configured_model`), each phase's trainable layers
(`set_phase`), the compiled step (`compile_model`), the augmentation and the input
pipeline's knobs.
"""

import keras

from effpipe import augment, input_pipeline, models
from effpipe.config import TrainConfig


def tuner_command(config: TrainConfig) -> str:
    """The batch-size tuner's command for this run's model, for messages."""
    flags = [f"--variant={config.variant}", f"--image_size={config.resolved_image_size}"]
    if config.mixed_precision:
        flags.append("--mixed_precision")
    flags.append(f"--unfreeze_blocks={config.unfreeze_blocks}")
    return " ".join(["python -m effpipe.tune_batch", *flags, "--memory_budget_gb=GB"])


def make_configured_model(
    config: TrainConfig,
    source_size,
    num_classes: int,
    weights: str | None = None,
    random_weights: bool = False,
    synchronized_batch_norm: bool = False,
):
    """`models.make_model` with the run's flags (trainer, tuner and benchmarks).

    Args:
      config: the run configuration.
      source_size: (height, width) of the uint8 source images.
      num_classes: outputs of the classifier.
      weights: overrides `config.weights` (the benchmarks pass a local file).
      random_weights: the same model with a randomly initialised base (the
        batch-size tuner: no download, the same graph and memory).
      synchronized_batch_norm: the head's BatchNormalization computes its batch
        statistics over all replicas (several replicas), as one device would.

    Returns:
      The uncompiled model, base frozen.
    """
    return models.make_model(
        variant=config.variant,
        image_size=config.resolved_image_size,
        source_size=source_size,
        num_classes=num_classes,
        weights=config.weights if weights is None else weights,
        head=config.head,
        dropout=config.dropout,
        augment_config=augment_config(config),
        seed=config.seed,
        compile_augmentation=not config.debug_numerics,
        random_weights=random_weights,
        synchronized_batch_norm=synchronized_batch_norm,
    )


def set_phase(model: keras.Model, config: TrainConfig, phase: int) -> list[str]:
    """Sets the trainable flags of `phase` (trainer and batch-size tuner).

    Phase 1 freezes the whole base. Phase 2 unfreezes the top --unfreeze_blocks
    blocks and the top conv; BatchNormalization stays frozen, except in a base
    trained from scratch, which has no pretrained statistics to keep. Recompile
    afterwards.

    Returns:
      The unfrozen blocks (none in phase 1).
    """
    if phase == 1:
        models.freeze_base(model)
        return []
    return models.unfreeze_top_blocks(
        model, config.unfreeze_blocks, freeze_batch_norm=config.weights != "none"
    )


def pipeline_options_of(config: TrainConfig) -> input_pipeline.PipelineOptions:
    """The input pipeline's knobs from the run's flags (trainer and benchmarks)."""
    return input_pipeline.PipelineOptions(
        deterministic=config.deterministic, autotune=config.autotune, threads=config.data_threads
    )


def augment_config(config: TrainConfig) -> augment.AugmentConfig | None:
    """The random transform of training batches from the run's flags.

    Args:
      config: the run configuration.

    Returns:
      The AugmentConfig of its augmentation flags, or None with --noaugment.
    """
    if not config.augment:
        return None
    return augment.AugmentConfig(
        rotation_degrees=config.rotation_degrees,
        shift_fraction=config.shift_fraction,
        shear_degrees=config.shear_degrees,
        zoom_fraction=config.zoom_fraction,
        horizontal_flip=config.horizontal_flip,
        fill_mode=config.fill_mode,
    )


def describe_augmentation(config: TrainConfig) -> str:
    if not config.augment:
        return "off"
    return (
        f"on the device: rotation +-{config.rotation_degrees:g} deg, shift "
        f"+-{config.shift_fraction:g}, shear +-{config.shear_degrees:g} deg, zoom "
        f"+-{config.zoom_fraction:g}, flip {'on' if config.horizontal_flip else 'off'}, "
        f"fill {config.fill_mode}"
    )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    *,
    jit_compile: bool,
    optimizer: keras.optimizers.Optimizer | None = None,
) -> None:
    """Compiles for sparse integer labels; needed again after changing `trainable`.

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer.

    Args:
      model: the model to compile.
      learning_rate: Adam's learning rate.
      jit_compile: compile the train step with XLA.
      optimizer: use this optimizer instead of a new Adam (the phase-1 head model
        takes the full model's, so the resume state holds its variables).
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
    )
