"""The recipe's model and step from a run's flags, shared by the trainer, the
batch-size tuner and the benchmarks, so that all three build and compile the same
thing: the model (`make_configured_model`), each phase's trainable layers
(`set_phase`), the compiled step (`compile_model`), the augmentation and the input
pipeline's knobs.
"""

import keras

from effpipe import augment, input_pipeline, models
from effpipe.config import TrainConfig
from effpipe.errors import UsageError

# The most train steps per compiled call that --steps_per_execution=0 (auto) picks.
# Each call costs the host about 0.95 ms (Python, the tf.function call, Keras' logs
# turned into floats after every call on the TensorFlow backend): measured by
# benchmarks.step_throughput on this project's CPU, the phase-1 head on cached
# features ran at 1.96 ms/step one step per call and 1.01 at 25 (WORKSPACE.md). A whole
# EfficientNet step on a CPU (260 ms for B0 at 224 px) hides that overhead, so the
# CPU keeps 1; a GPU or TPU step of a few milliseconds (B0 on a large GPU) does not.
AUTO_STEPS_PER_EXECUTION = {"head": 32, "gpu": 8, "tpu": 8, "cpu": 1}


def tuner_command(config: TrainConfig) -> str:
    """The batch-size tuner's command for this run's model, for messages."""
    flags = [f"--variant={config.variant}", f"--image_size={config.resolved_image_size}"]
    if config.mixed_precision:
        flags.append("--mixed_precision")
        if config.mixed_precision_dtype != "auto":
            flags.append(f"--mixed_precision_dtype={config.mixed_precision_dtype}")
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


def resolve_steps_per_execution(
    config: TrainConfig, steps_per_epoch: int, *, accelerator: str, head_only: bool = False
) -> tuple[int, str]:
    """The train steps per compiled call of one phase, with the reason for the log.

    An epoch must be a whole number of calls: Keras runs every call's N steps on an
    endless stream, so a call that crossed the epoch's end would train steps of the
    next epoch and break the resume arithmetic.

    Args:
      config: the run configuration (--steps_per_execution, --profile_steps).
      steps_per_epoch: train steps of one epoch.
      accelerator: "gpu", "tpu" or "cpu".
      head_only: the phase fits the head alone (phase 1 on cached features).

    Returns:
      (steps per call, reason).

    Raises:
      UsageError: an explicit --steps_per_execution that does not divide the epoch.
    """
    requested = config.steps_per_execution
    if requested:
        if steps_per_epoch % requested:
            raise UsageError(
                f"--steps_per_execution={requested} must divide the {steps_per_epoch} train "
                f"steps of an epoch: use {_largest_divisor(steps_per_epoch, requested)}, or "
                "0 (auto)"
            )
        return requested, f"{requested} train step(s) per call (--steps_per_execution)"
    if config.profile_steps:
        return 1, "1 train step per call (auto: --profile_steps traces single steps)"
    kind = "head" if head_only else accelerator
    steps = _largest_divisor(steps_per_epoch, AUTO_STEPS_PER_EXECUTION[kind])
    what = "the head on cached features" if head_only else f"the whole model on {kind.upper()}"
    return steps, (
        f"{steps} train step(s) per call (auto: up to {AUTO_STEPS_PER_EXECUTION[kind]} for "
        f"{what}, dividing the {steps_per_epoch} steps of an epoch)"
    )


def _largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, max(min(number, at_most), 1) + 1) if number % d == 0)


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
