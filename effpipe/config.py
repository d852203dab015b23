"""The one frozen, validated configuration of a training run.

Binaries build a `TrainConfig` from flags (`effpipe.cli_flags`); libraries take it
as an argument and never read flags. Validation happens once, at construction, and
raises `UsageError` naming the bad value and the fix.
"""

import dataclasses

from effpipe import variants
from effpipe.errors import UsageError

HEADS = ("pooled", "seed")
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
    "phase1_learning_rate",
    "phase2_learning_rate",
    "data_threads",
    "autotune",
    "debug_numerics",
    "profile_steps",
    "export",
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: EfficientNet variant, resolution, weights and head (effpipe.model)."""

    variant: str = "b0"
    image_size: int = 0
    weights: str = "imagenet"
    head: str = "pooled"
    dropout: float = 0.2

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


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Where the replicas come from (effpipe.training.distribution)."""

    strategy: str = "auto"
    data_service: str = ""


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
    """What the run writes besides its state and metrics (effpipe.outputs)."""

    profile_steps: str = ""
    export: bool = True

    @property
    def profile_step_range(self) -> tuple[int, int] | None:
        """--profile_steps as (first, last) train steps of each phase, or None."""
        if not self.profile_steps:
            return None
        first, last = (int(part) for part in self.profile_steps.split(","))
        return first, last


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
FIELD_SLICES = {
    **{name: None for name in TOP_LEVEL_FIELDS},
    **{
        field.name: slice_name
        for slice_name, cls in SLICES.items()
        for field in dataclasses.fields(cls)
    },
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except where its outputs go.

    Each layer receives only its slice (`config.data` to the input pipeline,
    `config.model` to the model factory, ...). Every field is a flag of the same name
    (`python -m effpipe.train --helpshort`); `from_flat` and `to_flat` convert from and
    to the flat {flag name: value} dict that flags, flagfiles and config.json hold.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    phases: PhasesConfig = PhasesConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    distribution: DistributionConfig = DistributionConfig()
    outputs: OutputsConfig = OutputsConfig()
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        _validate(self)

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
    def uses_phase1_feature_cache(self) -> bool:
        """Whether phase 1 trains the head on cached pooled features (see `feature_cache`)."""
        return resolve_phase1_feature_cache(self)[0]


def resolve_phase1_feature_cache(
    config: TrainConfig, distributed: bool = False
) -> tuple[bool, str]:
    """Resolves --phase1_feature_cache, with the reason for the log.

    The cache applies when the base's pooled output of an image is the same in every
    phase-1 epoch: no random augmentation before the base, and a head that pools
    first (pooled). "on" where it cannot apply is refused at validation. auto also
    leaves it off for a base trained from scratch (--weights=none): that base follows
    the training flag, so its stochastic depth changes the features every epoch and
    the cache (its inference output) would train another head; "on" accepts that.
    Under a distribution strategy it is off: the cache's head model, which shares
    the full model's layers, is built and tested on one device only.

    Args:
      config: the run configuration.
      distributed: the run resolved to a strategy other than the default one.

    Returns:
      (on, reason).
    """
    if config.phases.phase1_feature_cache == "off":
        return False, "phase-1 feature cache off (--phase1_feature_cache=off)"
    if config.phases.phase1_feature_cache == "on":
        if distributed:
            raise UsageError(
                f"--phase1_feature_cache=on needs one device, and --strategy={config.distribution.strategy} "
                "resolved to several replicas: pass --phase1_feature_cache=auto or off"
            )
        return True, "phase-1 feature cache on (--phase1_feature_cache=on)"
    if distributed:
        return False, "phase-1 feature cache off (auto: it runs on one device, without a strategy)"
    if config.augmentation.augment:
        return False, "phase-1 feature cache off (auto: augmentation changes the features)"
    if config.model.head != "pooled":
        return False, f"phase-1 feature cache off (auto: the {config.model.head} head pools last)"
    if config.model.weights == "none":
        return False, (
            "phase-1 feature cache off (auto: a base trained from scratch draws stochastic "
            "depth in training, so its features change every epoch)"
        )
    return True, "phase-1 feature cache on (auto: no augmentation, pooled head, pretrained base)"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _validate(config: TrainConfig) -> None:
    """Raises UsageError for the first bad field, with the fix in the message."""
    _require(
        config.model.variant in variants.VARIANTS,
        f"unknown variant {config.model.variant!r}: choose one of {', '.join(variants.VARIANTS)}",
    )
    _require(
        config.model.image_size == 0
        or variants.MIN_IMAGE_SIZE <= config.model.image_size <= MAX_IMAGE_SIZE,
        f"--image_size={config.model.image_size} is out of range: use 0 for the variant's "
        f"native size, or {variants.MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels",
    )
    _require(
        config.data.dataset in ("cifar100", "shapes")
        or (
            config.data.dataset.startswith("folder:") and len(config.data.dataset) > len("folder:")
        ),
        f"unknown dataset {config.data.dataset!r}: choose one of {', '.join(DATASET_KINDS)}",
    )
    _require(
        8 <= config.data.source_size <= MAX_IMAGE_SIZE,
        f"--source_size={config.data.source_size} is out of range: use 8..{MAX_IMAGE_SIZE} pixels",
    )
    _require(
        config.data.on_bad_image in BAD_IMAGE_POLICIES,
        f"unknown on_bad_image {config.data.on_bad_image!r}: choose fail or skip",
    )
    _require(
        0.0 < config.data.validation_fraction < 1.0,
        f"--validation_fraction={config.data.validation_fraction} must be strictly between 0 and 1",
    )
    _require(
        config.data.validation_selection in VALIDATION_SELECTIONS,
        f"unknown validation_selection {config.data.validation_selection!r}: "
        f"choose one of {', '.join(VALIDATION_SELECTIONS)}",
    )
    _require(
        2 <= config.data.shapes_num_classes <= 10,
        f"--shapes_num_classes={config.data.shapes_num_classes} must be in 2..10 "
        "(the shapes dataset draws ten kinds of shape)",
    )
    _require(
        config.data.shapes_train_examples >= 2 * config.data.shapes_num_classes
        and config.data.shapes_test_examples >= 1,
        "--shapes_train_examples must be at least twice --shapes_num_classes and "
        "--shapes_test_examples at least 1",
    )
    _require(
        config.model.head in HEADS,
        f"unknown head {config.model.head!r}: choose one of {', '.join(HEADS)}",
    )
    _require(
        0.0 <= config.model.dropout < 1.0, f"--dropout={config.model.dropout} must be in [0, 1)"
    )
    _require(
        0.0 <= config.augmentation.rotation_degrees <= 180.0,
        f"--rotation_degrees={config.augmentation.rotation_degrees} must be in 0..180",
    )
    _require(
        0.0 <= config.augmentation.shift_fraction <= 1.0,
        f"--shift_fraction={config.augmentation.shift_fraction} must be in 0..1 (a share of the image side)",
    )
    _require(
        0.0 <= config.augmentation.shear_degrees < 90.0,
        f"--shear_degrees={config.augmentation.shear_degrees} must be in [0, 90) degrees",
    )
    _require(
        0.0 <= config.augmentation.zoom_fraction < 1.0,
        f"--zoom_fraction={config.augmentation.zoom_fraction} must be in [0, 1) (zoom is drawn from "
        "1 - z to 1 + z)",
    )
    _require(
        config.augmentation.fill_mode in FILL_MODES,
        f"unknown fill_mode {config.augmentation.fill_mode!r}: choose one of {', '.join(FILL_MODES)}",
    )
    _require(config.batch_size >= 1, f"--batch_size={config.batch_size} must be at least 1")
    for phase in (1, 2):
        epochs = getattr(config.phases, f"phase{phase}_epochs")
        learning_rate = getattr(config.phases, f"phase{phase}_learning_rate")
        _require(epochs >= 0, f"--phase{phase}_epochs={epochs} must be 0 or more")
        _require(
            learning_rate > 0, f"--phase{phase}_learning_rate={learning_rate} must be positive"
        )
    _require(
        config.phases.unfreeze_blocks >= 0,
        f"--unfreeze_blocks={config.phases.unfreeze_blocks} must be 0 or more",
    )
    _require(
        config.runtime.xla in XLA_MODES,
        f"unknown xla mode {config.runtime.xla!r}: choose one of auto, on, off",
    )
    _require(
        config.runtime.mixed_precision_dtype in MIXED_PRECISION_DTYPES,
        f"unknown mixed_precision_dtype {config.runtime.mixed_precision_dtype!r}: choose one of "
        f"{', '.join(MIXED_PRECISION_DTYPES)}",
    )
    _require(
        config.runtime.mixed_precision or config.runtime.mixed_precision_dtype == "auto",
        f"--mixed_precision_dtype={config.runtime.mixed_precision_dtype} chooses the 16-bit float of "
        "--mixed_precision, which is off: add --mixed_precision, or drop "
        "--mixed_precision_dtype",
    )
    _require(
        config.runtime.steps_per_execution >= 0,
        f"--steps_per_execution={config.runtime.steps_per_execution} must be 0 (auto) or more",
    )
    _require(
        config.runtime.steps_per_execution <= 1 or not config.outputs.profile_steps,
        f"--steps_per_execution={config.runtime.steps_per_execution} runs several steps per call, "
        f"so --profile_steps={config.outputs.profile_steps} could not trace exactly those steps: "
        "pass --steps_per_execution=0 (auto: 1 while profiling) or drop --profile_steps",
    )
    _require(
        config.phases.phase1_feature_cache in FEATURE_CACHE_MODES,
        f"unknown phase1_feature_cache {config.phases.phase1_feature_cache!r}: choose one of "
        "auto, on, off",
    )
    if config.phases.phase1_feature_cache == "on":
        _require(
            not config.augmentation.augment,
            "--phase1_feature_cache=on needs phase 1 without augmentation (a random "
            "transform changes the base's features every epoch, so they cannot be "
            "computed once): pass --noaugment, or --phase1_feature_cache=auto",
        )
        _require(
            config.distribution.strategy not in MULTI_REPLICA_STRATEGIES,
            f"--phase1_feature_cache=on needs one replica, not --strategy={config.distribution.strategy}: "
            "pass --strategy=default, or --phase1_feature_cache=auto",
        )
        _require(
            config.model.head == "pooled",
            f"--phase1_feature_cache=on needs --head=pooled (the {config.model.head} head runs "
            "BatchNormalization and Dropout before pooling, so there are no pooled "
            "features to cache): pass --head=pooled, or --phase1_feature_cache=auto",
        )
    _require(
        config.distribution.strategy in STRATEGIES,
        f"unknown strategy {config.distribution.strategy!r}: choose one of {', '.join(STRATEGIES)}",
    )
    _require(
        config.phases.base_batch_size >= 0,
        f"--base_batch_size={config.phases.base_batch_size} must be 0 (no scaling) or more",
    )
    _require(
        not config.distribution.data_service
        or _valid_service_address(config.distribution.data_service),
        f"--data_service={config.distribution.data_service} must be grpc://HOST:PORT (a tf.data service "
        "dispatcher, e.g. from python -m effpipe.data_service), or empty",
    )
    _require(
        config.runtime.data_threads >= 0,
        f"--data_threads={config.runtime.data_threads} must be 0 or more",
    )
    _require(
        _valid_profile_steps(config.outputs.profile_steps),
        _PROFILE_STEPS_MESSAGE % config.outputs.profile_steps,
    )


_PROFILE_STEPS_MESSAGE = (
    "--profile_steps=%s must be START,END: the first and last train steps of each "
    "phase to trace, 1 <= START <= END (e.g. 10,20); empty for no trace"
)


def _valid_profile_steps(value: str) -> bool:
    if not value:
        return True
    parts = value.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        return False
    first, last = (int(part) for part in parts)
    return 1 <= first <= last


def _valid_service_address(value: str) -> bool:
    host, _, port = value.removeprefix("grpc://").rpartition(":")
    return value.startswith("grpc://") and bool(host) and port.isdigit()
