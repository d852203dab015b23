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
class TrainConfig:
    """Everything that defines a training run except where its outputs go.

    The flag of the same name documents each field (`python -m effpipe.train
    --helpshort`).
    """

    # Data.
    dataset: str = "cifar100"
    data_dir: str | None = None
    source_size: int = 32
    validation_fraction: float = 0.1
    validation_selection: str = "random"
    shapes_num_classes: int = 10
    shapes_train_examples: int = 3000
    shapes_test_examples: int = 600
    on_bad_image: str = "fail"
    # Model.
    variant: str = "b0"
    image_size: int = 0
    weights: str = "imagenet"
    head: str = "pooled"
    dropout: float = 0.2
    # Augmentation, on the device inside the train step (effpipe.model.augment).
    augment: bool = True
    rotation_degrees: float = 40.0
    shift_fraction: float = 0.2
    shear_degrees: float = 0.2
    zoom_fraction: float = 0.2
    horizontal_flip: bool = True
    fill_mode: str = "nearest"
    # Training recipe.
    batch_size: int = 32
    phase1_epochs: int = 10
    phase1_learning_rate: float = 1e-4
    phase2_epochs: int = 10
    phase2_learning_rate: float = 1e-5
    unfreeze_blocks: int = 3
    # Performance and reproducibility.
    mixed_precision: bool = False
    mixed_precision_dtype: str = "auto"
    xla: str = "auto"
    steps_per_execution: int = 0
    seed: int = 0
    deterministic: bool = False
    data_threads: int = 0
    autotune: bool = True
    debug_numerics: bool = False
    phase1_feature_cache: str = "auto"
    # Distribution (effpipe.training.distribution).
    strategy: str = "auto"
    base_batch_size: int = 0
    data_service: str = ""
    # Outputs.
    profile_steps: str = ""
    export: bool = True

    def __post_init__(self):
        _validate(self)

    @property
    def resolved_image_size(self) -> int:
        """The model resolution in pixels: `image_size`, or the variant's native size."""
        return self.image_size or variants.VARIANTS[self.variant].native_image_size

    @property
    def profile_step_range(self) -> tuple[int, int] | None:
        """--profile_steps as (first, last) train steps of each phase, or None."""
        if not self.profile_steps:
            return None
        first, last = (int(part) for part in self.profile_steps.split(","))
        return first, last

    def learning_rate(self, phase: int) -> float:
        """Phase `phase`'s learning rate, scaled linearly by batch_size / base_batch_size
        when --base_batch_size is set (Goyal et al. 2017)."""
        rate = getattr(self, f"phase{phase}_learning_rate")
        return rate * self.batch_size / self.base_batch_size if self.base_batch_size else rate

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
    if config.phase1_feature_cache == "off":
        return False, "phase-1 feature cache off (--phase1_feature_cache=off)"
    if config.phase1_feature_cache == "on":
        if distributed:
            raise UsageError(
                f"--phase1_feature_cache=on needs one device, and --strategy={config.strategy} "
                "resolved to several replicas: pass --phase1_feature_cache=auto or off"
            )
        return True, "phase-1 feature cache on (--phase1_feature_cache=on)"
    if distributed:
        return False, "phase-1 feature cache off (auto: it runs on one device, without a strategy)"
    if config.augment:
        return False, "phase-1 feature cache off (auto: augmentation changes the features)"
    if config.head != "pooled":
        return False, f"phase-1 feature cache off (auto: the {config.head} head pools last)"
    if config.weights == "none":
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
        config.variant in variants.VARIANTS,
        f"unknown variant {config.variant!r}: choose one of {', '.join(variants.VARIANTS)}",
    )
    _require(
        config.image_size == 0 or variants.MIN_IMAGE_SIZE <= config.image_size <= MAX_IMAGE_SIZE,
        f"--image_size={config.image_size} is out of range: use 0 for the variant's "
        f"native size, or {variants.MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels",
    )
    _require(
        config.dataset in ("cifar100", "shapes")
        or (config.dataset.startswith("folder:") and len(config.dataset) > len("folder:")),
        f"unknown dataset {config.dataset!r}: choose one of {', '.join(DATASET_KINDS)}",
    )
    _require(
        8 <= config.source_size <= MAX_IMAGE_SIZE,
        f"--source_size={config.source_size} is out of range: use 8..{MAX_IMAGE_SIZE} pixels",
    )
    _require(
        config.on_bad_image in BAD_IMAGE_POLICIES,
        f"unknown on_bad_image {config.on_bad_image!r}: choose fail or skip",
    )
    _require(
        0.0 < config.validation_fraction < 1.0,
        f"--validation_fraction={config.validation_fraction} must be strictly between 0 and 1",
    )
    _require(
        config.validation_selection in VALIDATION_SELECTIONS,
        f"unknown validation_selection {config.validation_selection!r}: "
        f"choose one of {', '.join(VALIDATION_SELECTIONS)}",
    )
    _require(
        2 <= config.shapes_num_classes <= 10,
        f"--shapes_num_classes={config.shapes_num_classes} must be in 2..10 "
        "(the shapes dataset draws ten kinds of shape)",
    )
    _require(
        config.shapes_train_examples >= 2 * config.shapes_num_classes
        and config.shapes_test_examples >= 1,
        "--shapes_train_examples must be at least twice --shapes_num_classes and "
        "--shapes_test_examples at least 1",
    )
    _require(
        config.head in HEADS, f"unknown head {config.head!r}: choose one of {', '.join(HEADS)}"
    )
    _require(0.0 <= config.dropout < 1.0, f"--dropout={config.dropout} must be in [0, 1)")
    _require(
        0.0 <= config.rotation_degrees <= 180.0,
        f"--rotation_degrees={config.rotation_degrees} must be in 0..180",
    )
    _require(
        0.0 <= config.shift_fraction <= 1.0,
        f"--shift_fraction={config.shift_fraction} must be in 0..1 (a share of the image side)",
    )
    _require(
        0.0 <= config.shear_degrees < 90.0,
        f"--shear_degrees={config.shear_degrees} must be in [0, 90) degrees",
    )
    _require(
        0.0 <= config.zoom_fraction < 1.0,
        f"--zoom_fraction={config.zoom_fraction} must be in [0, 1) (zoom is drawn from "
        "1 - z to 1 + z)",
    )
    _require(
        config.fill_mode in FILL_MODES,
        f"unknown fill_mode {config.fill_mode!r}: choose one of {', '.join(FILL_MODES)}",
    )
    _require(config.batch_size >= 1, f"--batch_size={config.batch_size} must be at least 1")
    for phase in (1, 2):
        epochs = getattr(config, f"phase{phase}_epochs")
        learning_rate = getattr(config, f"phase{phase}_learning_rate")
        _require(epochs >= 0, f"--phase{phase}_epochs={epochs} must be 0 or more")
        _require(
            learning_rate > 0, f"--phase{phase}_learning_rate={learning_rate} must be positive"
        )
    _require(
        config.unfreeze_blocks >= 0,
        f"--unfreeze_blocks={config.unfreeze_blocks} must be 0 or more",
    )
    _require(
        config.xla in XLA_MODES, f"unknown xla mode {config.xla!r}: choose one of auto, on, off"
    )
    _require(
        config.mixed_precision_dtype in MIXED_PRECISION_DTYPES,
        f"unknown mixed_precision_dtype {config.mixed_precision_dtype!r}: choose one of "
        f"{', '.join(MIXED_PRECISION_DTYPES)}",
    )
    _require(
        config.mixed_precision or config.mixed_precision_dtype == "auto",
        f"--mixed_precision_dtype={config.mixed_precision_dtype} chooses the 16-bit float of "
        "--mixed_precision, which is off: add --mixed_precision, or drop "
        "--mixed_precision_dtype",
    )
    _require(
        config.steps_per_execution >= 0,
        f"--steps_per_execution={config.steps_per_execution} must be 0 (auto) or more",
    )
    _require(
        config.steps_per_execution <= 1 or not config.profile_steps,
        f"--steps_per_execution={config.steps_per_execution} runs several steps per call, "
        f"so --profile_steps={config.profile_steps} could not trace exactly those steps: "
        "pass --steps_per_execution=0 (auto: 1 while profiling) or drop --profile_steps",
    )
    _require(
        config.phase1_feature_cache in FEATURE_CACHE_MODES,
        f"unknown phase1_feature_cache {config.phase1_feature_cache!r}: choose one of "
        "auto, on, off",
    )
    if config.phase1_feature_cache == "on":
        _require(
            not config.augment,
            "--phase1_feature_cache=on needs phase 1 without augmentation (a random "
            "transform changes the base's features every epoch, so they cannot be "
            "computed once): pass --noaugment, or --phase1_feature_cache=auto",
        )
        _require(
            config.strategy not in MULTI_REPLICA_STRATEGIES,
            f"--phase1_feature_cache=on needs one replica, not --strategy={config.strategy}: "
            "pass --strategy=default, or --phase1_feature_cache=auto",
        )
        _require(
            config.head == "pooled",
            f"--phase1_feature_cache=on needs --head=pooled (the {config.head} head runs "
            "BatchNormalization and Dropout before pooling, so there are no pooled "
            "features to cache): pass --head=pooled, or --phase1_feature_cache=auto",
        )
    _require(
        config.strategy in STRATEGIES,
        f"unknown strategy {config.strategy!r}: choose one of {', '.join(STRATEGIES)}",
    )
    _require(
        config.base_batch_size >= 0,
        f"--base_batch_size={config.base_batch_size} must be 0 (no scaling) or more",
    )
    _require(
        not config.data_service or _valid_service_address(config.data_service),
        f"--data_service={config.data_service} must be grpc://HOST:PORT (a tf.data service "
        "dispatcher, e.g. from python -m effpipe.data_service), or empty",
    )
    _require(config.data_threads >= 0, f"--data_threads={config.data_threads} must be 0 or more")
    _require(
        _valid_profile_steps(config.profile_steps), _PROFILE_STEPS_MESSAGE % config.profile_steps
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
