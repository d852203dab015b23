"""The one frozen, validated configuration of a training run.

Binaries build a `TrainConfig` from flags (`effpipe.cli_flags`); libraries take it
as an argument and never read flags. Validation happens once, at construction, and
raises `UsageError` naming the bad value and the fix.
"""

import dataclasses

from effpipe import config_checks, variants
from effpipe.config_checks import (  # noqa: F401 (re-exported)
    BAD_IMAGE_POLICIES,
    CACHE_MODES,
    DATASET_KINDS,
    FEATURE_CACHE_MODES,
    FILL_MODES,
    HEAD_ALIASES,
    HEADS,
    LR_SCHEDULES,
    MAX_IMAGE_SIZE,
    MIXED_PRECISION_DTYPES,
    MULTI_REPLICA_STRATEGIES,
    OPTIMIZERS,
    POOLING_HEADS,
    SOURCE_CROPS,
    STRATEGIES,
    VALIDATION_SELECTIONS,
    XLA_MODES,
)
from effpipe.errors import UsageError

# Fields a resumed run may change: they steer the remaining training or its speed,
# not what the finished epochs mean (a lower learning rate after a NaN loss, say).
RESUMABLE_CHANGES = (
    *("phase1_learning_rate", "phase2_learning_rate", "data_threads", "autotune"),
    *("debug_numerics", "profile_steps", "export"),
    # Steps per compiled call: the same steps in the same order, fewer host round trips.
    "steps_per_execution",
    # Through a data service the training order is the service's, not the seed's:
    # finished epochs mean the same whichever fleet served them.
    "data_service",
    # Where decoded images are kept: the same images, from memory or from disk.
    *("cache", "cache_dir", "cache_memory_mb"),
    # How a from-scratch base is initialised: a resumed run restores its weights.
    "zero_init_residual",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how the train split is divided (effpipe.data)."""

    dataset: str = "cifar100"
    data_dir: str | None = None
    source_size: int = 0
    source_crop: str = "resize"
    cache: str = "auto"
    cache_dir: str = ""
    cache_memory_mb: int = 256
    validation_fraction: float = 0.1
    validation_selection: str = "random"
    shapes_num_classes: int = 10
    shapes_train_examples: int = 3000
    shapes_test_examples: int = 600
    on_bad_image: str = "fail"

    def __post_init__(self):
        config_checks.check_data(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: EfficientNet variant, resolution, weights and head (effpipe.model)."""

    variant: str = "b0"
    image_size: int = 0
    weights: str = "imagenet"
    head: str = "pooled"
    dropout: float = 0.2
    # From scratch only (--weights=none); see effpipe.model.efficientnet.
    stochastic_depth: float = 0.2
    zero_init_residual: bool = True

    def __post_init__(self):
        # The notebook's head was first called seed; old flagfiles and run directories say so.
        object.__setattr__(self, "head", HEAD_ALIASES.get(self.head, self.head))
        config_checks.check_model(self)

    @property
    def resolved_image_size(self) -> int:
        """The model resolution in pixels: `image_size`, or the variant's native size."""
        return self.image_size or variants.VARIANTS[self.variant].native_image_size


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """The random transform of training batches, on the device (effpipe.model.augment)."""

    augment: bool = True
    rotation_degrees: float = 40.0
    shift_fraction: float = 0.2
    shear_degrees: float = 0.2
    zoom_fraction: float = 0.2
    horizontal_flip: bool = True
    fill_mode: str = "nearest"

    def __post_init__(self):
        config_checks.check_augmentation(self)


@dataclasses.dataclass(frozen=True)
class PhasesConfig:
    """The two-phase recipe: epochs, learning rates and their schedule, the optimizer
    and its regularisers, what phase 2 unfreezes, and whether phase 1 trains on cached
    features (effpipe.training; the schedule and optimizer: effpipe.training.optimization).

    Each phase runs its own schedule over its own epochs, with the same warm-up; the
    defaults are the notebook's recipe (constant Adam, no smoothing, no decay).
    """

    phase1_epochs: int = 10
    phase1_learning_rate: float = 1e-4
    phase2_epochs: int = 10
    phase2_learning_rate: float = 1e-5
    unfreeze_blocks: int = 3
    base_batch_size: int = 0
    phase1_feature_cache: str = "auto"
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    lr_min_fraction: float = 0.0
    lr_decay_rate: float = 0.97
    lr_decay_epochs: float = 2.4
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        config_checks.check_phases(self)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the steps run: precision, XLA, steps per call, determinism, input threads
    (effpipe.training.runtime, effpipe.data.pipeline)."""

    mixed_precision: bool = False
    mixed_precision_dtype: str = "auto"
    xla: str = "auto"
    steps_per_execution: int = 0
    deterministic: bool = False
    data_threads: int = 0
    autotune: bool = True
    debug_numerics: bool = False

    def __post_init__(self):
        config_checks.check_runtime(self)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Where the replicas come from (effpipe.training.distribution)."""

    strategy: str = "auto"
    data_service: str = ""

    def __post_init__(self):
        config_checks.check_distribution(self)


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
    """What the run writes besides its state and metrics (effpipe.outputs)."""

    profile_steps: str = ""
    export: bool = True

    def __post_init__(self):
        config_checks.check_outputs(self)

    @property
    def profile_step_range(self) -> tuple[int, int] | None:
        """--profile_steps as (first, last) train steps of each phase, or None."""
        parts = self.profile_steps.split(",") if self.profile_steps else None
        return (int(parts[0]), int(parts[1])) if parts else None


# The slices of a TrainConfig, by attribute name; each flag is a field of one slice.
SLICES = {
    "data": DataConfig,
    "model": ModelConfig,
    "augmentation": AugmentationConfig,
    "phases": PhasesConfig,
    "runtime": RuntimeConfig,
    "distribution": DistributionConfig,
    "outputs": OutputsConfig,
}
# Fields that every layer needs, kept at the top: the global batch and the RNG seed.
TOP_LEVEL_FIELDS = ("batch_size", "seed")
# Flag name -> the slice that holds it (None: top level).
FIELD_SLICES = dict.fromkeys(TOP_LEVEL_FIELDS)
for _slice_name, _slice in SLICES.items():
    for _field in dataclasses.fields(_slice):
        assert _field.name not in FIELD_SLICES, f"{_field.name} is in two slices"
        FIELD_SLICES[_field.name] = _slice_name
# The sections of `--helpshort` and `--print_config`, in order: one per slice, and
# one (None) for the top-level fields.
SECTION_TITLES = {
    "data": "Data: where the images come from and how the train split is divided",
    "model": "Model: the EfficientNet variant, its resolution, weights and head",
    "augmentation": "Augmentation: on the device, fused with the resize",
    None: "Batch size and seed",
    "phases": "Training recipe: the two phases, their schedule and optimizer",
    "runtime": "Performance and reproducibility: precision, XLA, steps per call",
    "distribution": "Distribution: replicas, machines and an input fleet",
    "outputs": "Outputs",
}
assert set(SECTION_TITLES) == set(FIELD_SLICES.values())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except where its outputs go.

    Each layer receives only its slice (`config.data` to the input pipeline,
    `config.model` to the model factory, ...). Every field is a flag of the same name
    (`python -m effpipe.train --helpshort`); `from_flat` and `to_flat` convert from and
    to the flat {flag name: value} dict that flags, flagfiles and config.json hold.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    phases: PhasesConfig = dataclasses.field(default_factory=PhasesConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    distribution: DistributionConfig = dataclasses.field(default_factory=DistributionConfig)
    outputs: OutputsConfig = dataclasses.field(default_factory=OutputsConfig)
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        config_checks.check_across_slices(self)

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """The config of flat {flag name: value} fields; missing fields keep their default.

        Raises:
          UsageError: an unknown field, or a value that validation refuses.
        """
        unknown = sorted(set(values) - set(FIELD_SLICES))
        if unknown:
            raise UsageError(f"unknown configuration field(s) {', '.join(unknown)}")
        slices = {
            slice_name: cls_(**{k: v for k, v in values.items() if FIELD_SLICES[k] == slice_name})
            for slice_name, cls_ in SLICES.items()
        }
        top = {k: v for k, v in values.items() if FIELD_SLICES[k] is None}
        return cls(**slices, **top)

    def to_flat(self) -> dict:
        """{flag name: value} of every field, as config.json records it."""
        flat = {name: getattr(self, name) for name in TOP_LEVEL_FIELDS}
        for slice_name in SLICES:
            flat.update(dataclasses.asdict(getattr(self, slice_name)))
        return flat

    def replace(self, **values) -> "TrainConfig":
        """A copy with these flat fields changed, validated again."""
        return TrainConfig.from_flat(**{**self.to_flat(), **values})

    def learning_rate(self, phase: int) -> float:
        """Phase `phase`'s learning rate, scaled linearly by batch_size / base_batch_size
        when --base_batch_size is set (Goyal et al. 2017)."""
        rate = getattr(self.phases, f"phase{phase}_learning_rate")
        base = self.phases.base_batch_size
        return rate * self.batch_size / base if base else rate

    @property
    def source_size(self) -> int:
        """Side in pixels the images are stored at on the host: --source_size, else 32
        for cifar100 and shapes (CIFAR's own size) and the model resolution for folder and
        tfds sources, so a B5 run stores 456 px photos (a tfds dataset whose images all
        have one size smaller than that keeps it: effpipe.data.sources)."""
        if self.data.source_size:
            return self.data.source_size
        if self.data.dataset in ("cifar100", "shapes"):
            return 32
        return self.model.resolved_image_size


# The data fields added with the decoded cache, as a run recorded without them ran.
OLDER_RUN_DATA_FIELDS = {
    "source_crop": "resize",
    "cache": "auto",
    "cache_dir": "",
    "cache_memory_mb": 256,
}
# The recipe fields added with the schedules and regularisers, as a run recorded
# without them ran: constant Adam on hard labels.
OLDER_RUN_RECIPE_FIELDS = {
    "lr_schedule": "constant",
    "warmup_epochs": 0.0,
    "lr_min_fraction": 0.0,
    "lr_decay_rate": 0.97,
    "lr_decay_epochs": 2.4,
    "optimizer": "adam",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
}
# The from-scratch initialisation fields, as a run recorded without them was built:
# Keras' stochastic depth and Keras' initialisation from scratch; a pretrained base
# ignores both, so its run reads as recorded with today's defaults.
OLDER_RUN_INIT_FIELDS = {"stochastic_depth": 0.2, "zero_init_residual": False}


def upgrade_recorded(recorded: dict) -> dict:
    """The flat fields an older effpipe recorded (config.json), in today's terms.

    A run recorded before a field existed reads as having run with the value that
    reproduces it, so the same command resumes it; the notebook head's older name,
    seed, reads as notebook.

    Args:
      recorded: the {flag name: value} dict a run directory's config.json holds.

    Returns:
      A new dict, comparable with `TrainConfig.to_flat()`.
    """
    recorded = dict(recorded)
    if "head" in recorded:
        recorded["head"] = HEAD_ALIASES.get(recorded["head"], recorded["head"])
    if "cache" not in recorded:
        # Recorded before the decoded cache: CIFAR's and the shapes' 32 px was the
        # default then, which is now written 0 (auto, still 32 for them).
        recorded.update(OLDER_RUN_DATA_FIELDS)
        if recorded.get("source_size") == 32 and recorded.get("dataset") in ("cifar100", "shapes"):
            recorded["source_size"] = 0
    if "lr_schedule" not in recorded:
        recorded.update(OLDER_RUN_RECIPE_FIELDS)
    if "stochastic_depth" not in recorded:
        recorded.update(OLDER_RUN_INIT_FIELDS)
        if recorded.get("weights") != "none":
            recorded["zero_init_residual"] = True
    return recorded
