"""The one frozen, validated configuration of a training run.

Binaries build a `TrainConfig` from flags (`effpipe.cli_flags`); libraries take it
as an argument and never read flags. Validation happens once, at construction, and
raises `UsageError` naming the bad value and the fix.
"""

import dataclasses

from effpipe import variants
from effpipe.errors import UsageError

# pooled: GAP -> BN -> Dropout -> Dense; notebook: BN -> Dropout -> GAP -> Dense, the
# original notebook's order, which --head=seed names too.
HEADS = ("pooled", "notebook")
HEAD_ALIASES = {"seed": "notebook"}
XLA_MODES = ("auto", "on", "off")
# The 16-bit float of --mixed_precision (effpipe.training.runtime resolves auto per device).
MIXED_PRECISION_DTYPES = ("auto", "float16", "bfloat16")
FEATURE_CACHE_MODES = ("auto", "on", "off")
VALIDATION_SELECTIONS = ("random", "last")
DATASET_KINDS = ("cifar100", "shapes", "folder:PATH")
BAD_IMAGE_POLICIES = ("fail", "skip")
# Where the replicas of a run come from (effpipe.training.distribution).
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
# Strategies that may run more than one replica; the phase-1 feature cache needs one.
MULTI_REPLICA_STRATEGIES = ("mirrored", "multi_worker", "tpu")
# How the augmentation fills samples outside the source image (effpipe.model.augment).
FILL_MODES = ("nearest", "reflect", "constant")

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
)

# Larger inputs than this are almost surely a typo (B7's native size is 600 px).
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how the train split is divided (effpipe.data)."""

    dataset: str = "cifar100"
    data_dir: str | None = None
    source_size: int = 32
    validation_fraction: float = 0.1
    validation_selection: str = "random"
    shapes_num_classes: int = 10
    shapes_train_examples: int = 3000
    shapes_test_examples: int = 600
    on_bad_image: str = "fail"

    def __post_init__(self):
        _check_data(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: EfficientNet variant, resolution, weights and head (effpipe.model)."""

    variant: str = "b0"
    image_size: int = 0
    weights: str = "imagenet"
    head: str = "pooled"
    dropout: float = 0.2

    def __post_init__(self):
        # The notebook's head was first called seed; old flagfiles and run directories say so.
        object.__setattr__(self, "head", HEAD_ALIASES.get(self.head, self.head))
        _check_model(self)

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
        _check_augmentation(self)


@dataclasses.dataclass(frozen=True)
class PhasesConfig:
    """The two-phase recipe: epochs, learning rates, what phase 2 unfreezes, and
    whether phase 1 trains on cached features (effpipe.training)."""

    phase1_epochs: int = 10
    phase1_learning_rate: float = 1e-4
    phase2_epochs: int = 10
    phase2_learning_rate: float = 1e-5
    unfreeze_blocks: int = 3
    base_batch_size: int = 0
    phase1_feature_cache: str = "auto"

    def __post_init__(self):
        _check_phases(self)


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
        _check_runtime(self)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Where the replicas come from (effpipe.training.distribution)."""

    strategy: str = "auto"
    data_service: str = ""

    def __post_init__(self):
        _check_distribution(self)


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
    """What the run writes besides its state and metrics (effpipe.outputs)."""

    profile_steps: str = ""
    export: bool = True

    def __post_init__(self):
        _check_outputs(self)

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
        _check_across_slices(self)

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


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _require_choice(flag: str, value, choices) -> None:
    _require(value in choices, f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")


def _require_range(flag: str, value, low, high, *, high_open: bool = False, why: str = "") -> None:
    """Requires low <= value <= high (value < high when `high_open`)."""
    inside = low <= value and (value < high if high_open else value <= high)
    bracket = f"[{low:g}, {high:g})" if high_open else f"{low:g}..{high:g}"
    _require(inside, f"--{flag}={value} must be in {bracket}{why}")


def _require_zero_or_more(flag: str, value, meaning_of_zero: str = "") -> None:
    _require(value >= 0, f"--{flag}={value} must be 0{meaning_of_zero} or more")


def _check_data(data: DataConfig) -> None:
    dataset = data.dataset
    _require(
        dataset in ("cifar100", "shapes")
        or (dataset.startswith("folder:") and len(dataset) > len("folder:")),
        f"unknown dataset {dataset!r}: choose one of {', '.join(DATASET_KINDS)}",
    )
    _require(
        8 <= data.source_size <= MAX_IMAGE_SIZE,
        f"--source_size={data.source_size} is out of range: use 8..{MAX_IMAGE_SIZE} pixels",
    )
    _require(
        data.on_bad_image in BAD_IMAGE_POLICIES,
        f"unknown on_bad_image {data.on_bad_image!r}: choose fail or skip",
    )
    _require(
        0.0 < data.validation_fraction < 1.0,
        f"--validation_fraction={data.validation_fraction} must be strictly between 0 and 1",
    )
    _require_choice("validation_selection", data.validation_selection, VALIDATION_SELECTIONS)
    why = " (the shapes dataset draws ten kinds of shape)"
    _require_range("shapes_num_classes", data.shapes_num_classes, 2, 10, why=why)
    _require(
        data.shapes_train_examples >= 2 * data.shapes_num_classes
        and data.shapes_test_examples >= 1,
        "--shapes_train_examples must be at least twice --shapes_num_classes and "
        "--shapes_test_examples at least 1",
    )


def _check_model(model: ModelConfig) -> None:
    _require_choice("variant", model.variant, tuple(variants.VARIANTS))
    _require(
        model.image_size == 0 or variants.MIN_IMAGE_SIZE <= model.image_size <= MAX_IMAGE_SIZE,
        f"--image_size={model.image_size} is out of range: use 0 for the variant's "
        f"native size, or {variants.MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels",
    )
    _require_choice("head", model.head, HEADS)
    _require_range("dropout", model.dropout, 0.0, 1.0, high_open=True)


def _check_augmentation(augmentation: AugmentationConfig) -> None:
    _require_range("rotation_degrees", augmentation.rotation_degrees, 0.0, 180.0)
    _require_range(
        "shift_fraction", augmentation.shift_fraction, 0.0, 1.0, why=" (a share of the image side)"
    )
    _require_range(
        "shear_degrees", augmentation.shear_degrees, 0.0, 90.0, high_open=True, why=" degrees"
    )
    zoom, why = augmentation.zoom_fraction, " (zoom is drawn from 1 - z to 1 + z)"
    _require_range("zoom_fraction", zoom, 0.0, 1.0, high_open=True, why=why)
    _require_choice("fill_mode", augmentation.fill_mode, FILL_MODES)


def _check_phases(phases: PhasesConfig) -> None:
    for phase in (1, 2):
        epochs = getattr(phases, f"phase{phase}_epochs")
        learning_rate = getattr(phases, f"phase{phase}_learning_rate")
        _require_zero_or_more(f"phase{phase}_epochs", epochs)
        _require(
            learning_rate > 0, f"--phase{phase}_learning_rate={learning_rate} must be positive"
        )
    _require_zero_or_more("unfreeze_blocks", phases.unfreeze_blocks)
    _require_zero_or_more("base_batch_size", phases.base_batch_size, " (no scaling)")
    _require_choice("phase1_feature_cache", phases.phase1_feature_cache, FEATURE_CACHE_MODES)


def _check_runtime(runtime: RuntimeConfig) -> None:
    _require_choice("xla mode", runtime.xla, XLA_MODES)
    _require_choice("mixed_precision_dtype", runtime.mixed_precision_dtype, MIXED_PRECISION_DTYPES)
    _require(
        runtime.mixed_precision or runtime.mixed_precision_dtype == "auto",
        f"--mixed_precision_dtype={runtime.mixed_precision_dtype} chooses the 16-bit float of "
        "--mixed_precision, which is off: add --mixed_precision, or drop "
        "--mixed_precision_dtype",
    )
    _require_zero_or_more("steps_per_execution", runtime.steps_per_execution, " (auto)")
    _require_zero_or_more("data_threads", runtime.data_threads)


def _check_distribution(distribution: DistributionConfig) -> None:
    _require_choice("strategy", distribution.strategy, STRATEGIES)
    service = distribution.data_service
    host, _, port = service.removeprefix("grpc://").rpartition(":")
    _require(
        not service or (service.startswith("grpc://") and bool(host) and port.isdigit()),
        f"--data_service={service} must be grpc://HOST:PORT (a tf.data service dispatcher, "
        "e.g. from python -m effpipe.data_service), or empty",
    )


def _check_outputs(outputs: OutputsConfig) -> None:
    parts = outputs.profile_steps.split(",") if outputs.profile_steps else []
    well_formed = not parts or (
        len(parts) == 2
        and all(part.strip().isdigit() for part in parts)
        and 1 <= int(parts[0]) <= int(parts[1])
    )
    _require(
        well_formed,
        f"--profile_steps={outputs.profile_steps} must be START,END: the first and last train "
        "steps of each phase to trace, 1 <= START <= END (e.g. 10,20); empty for no trace",
    )


def _check_across_slices(config: TrainConfig) -> None:
    """The checks that span slices; each slice has checked its own fields."""
    _require(config.batch_size >= 1, f"--batch_size={config.batch_size} must be at least 1")
    runtime, outputs = config.runtime, config.outputs
    _require(
        runtime.steps_per_execution <= 1 or not outputs.profile_steps,
        f"--steps_per_execution={runtime.steps_per_execution} runs several steps per call, "
        f"so --profile_steps={outputs.profile_steps} could not trace exactly those steps: "
        "pass --steps_per_execution=0 (auto: 1 while profiling) or drop --profile_steps",
    )
    if config.phases.phase1_feature_cache != "on":
        return
    _require(
        not config.augmentation.augment,
        "--phase1_feature_cache=on needs phase 1 without augmentation (a random "
        "transform changes the base's features every epoch, so they cannot be "
        "computed once): pass --noaugment, or --phase1_feature_cache=auto",
    )
    strategy = config.distribution.strategy
    _require(
        strategy not in MULTI_REPLICA_STRATEGIES,
        f"--phase1_feature_cache=on needs one replica, not --strategy={strategy}: "
        "pass --strategy=default, or --phase1_feature_cache=auto",
    )
    _require(
        config.model.head == "pooled",
        f"--phase1_feature_cache=on needs --head=pooled (the {config.model.head} head runs "
        "BatchNormalization and Dropout before pooling, so there are no pooled "
        "features to cache): pass --head=pooled, or --phase1_feature_cache=auto",
    )
