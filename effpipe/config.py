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
