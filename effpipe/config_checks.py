"""The rules a configuration must follow, and the choices its flags allow.

`effpipe.config` runs these checks when a slice is built; each raises `UsageError`
naming the bad value and the fix. Split from the config's dataclasses to keep each
module short; the constants are re-exported by `effpipe.config`. The checks take the
slices as arguments and import nothing of `effpipe.config`, which imports them.
"""

import dataclasses

from effpipe import variants
from effpipe.errors import UsageError

# pooled: GAP -> BN -> Dropout -> Dense; notebook: BN -> Dropout -> GAP -> Dense, the
# original notebook's order, which --head=seed names too.
HEADS = ("pooled", "notebook", "keras")
# The heads that pool right after the base: their pooled features can be cached.
POOLING_HEADS = ("pooled", "keras")
HEAD_ALIASES = {"seed": "notebook"}
XLA_MODES = ("auto", "on", "off")
# The 16-bit float of --mixed_precision (effpipe.training.runtime resolves auto per device).
MIXED_PRECISION_DTYPES = ("auto", "float16", "bfloat16")
FEATURE_CACHE_MODES = ("auto", "on", "off")
# The learning-rate schedule of each phase and the optimizer (effpipe.training.optimization).
LR_SCHEDULES = ("constant", "cosine", "exponential")
OPTIMIZERS = ("adam", "adamw", "sgd")
VALIDATION_SELECTIONS = ("random", "last")
DATASET_KINDS = ("cifar100", "shapes", "folder:PATH", "tfds:NAME[/CONFIG][@VERSION]")
# How the source images reach --source_size (effpipe.data.decode): squeezed whole, or
# the centre square cropped first.
SOURCE_CROPS = ("resize", "centre")
# Where decoded images are kept between passes (effpipe.data.cache).
CACHE_MODES = ("auto", "memory", "disk", "off")
BAD_IMAGE_POLICIES = ("fail", "skip")
# Where the replicas of a run come from (effpipe.training.distribution).
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
# Strategies that may run more than one replica; the phase-1 feature cache needs one.
MULTI_REPLICA_STRATEGIES = ("mirrored", "multi_worker", "tpu")
# How the augmentation fills samples outside the source image (effpipe.model.augment).
FILL_MODES = ("nearest", "reflect", "constant")

# Larger inputs than this are almost surely a typo (B7's native size is 600 px).
MAX_IMAGE_SIZE = 1024


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


def check_data(data) -> None:
    """Checks the fields of a DataConfig."""
    dataset = data.dataset
    kind, _, rest = dataset.partition(":")
    _require(
        dataset in ("cifar100", "shapes") or (kind in ("folder", "tfds") and bool(rest)),
        f"unknown dataset {dataset!r}: choose one of {', '.join(DATASET_KINDS)}",
    )
    _require(
        data.source_size == 0 or 8 <= data.source_size <= MAX_IMAGE_SIZE,
        f"--source_size={data.source_size} is out of range: use 0 (auto) or "
        f"8..{MAX_IMAGE_SIZE} pixels",
    )
    _require_choice("source_crop", data.source_crop, SOURCE_CROPS)
    _require_choice("cache", data.cache, CACHE_MODES)
    _require_zero_or_more("cache_memory_mb", data.cache_memory_mb, " (never in memory)")
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
        f"--shapes_train_examples={data.shapes_train_examples} must be at least twice "
        f"--shapes_num_classes={data.shapes_num_classes} and "
        f"--shapes_test_examples={data.shapes_test_examples} at least 1: raise them, or "
        "lower --shapes_num_classes",
    )


def check_model(model) -> None:
    """Checks the fields of a ModelConfig."""
    _require_choice("variant", model.variant, tuple(variants.VARIANTS))
    _require(
        model.image_size == 0 or variants.MIN_IMAGE_SIZE <= model.image_size <= MAX_IMAGE_SIZE,
        f"--image_size={model.image_size} is out of range: use 0 for the variant's "
        f"native size, or {variants.MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels",
    )
    _require_choice("head", model.head, HEADS)
    _require_range("dropout", model.dropout, 0.0, 1.0, high_open=True)
    _require_range("stochastic_depth", model.stochastic_depth, 0.0, 1.0, high_open=True)
    if model.weights != "none":
        # A pretrained base runs in inference mode, without stochastic depth, and
        # loads its weights rather than initialising them: these would do nothing.
        defaults = {field.name: field.default for field in dataclasses.fields(model)}
        for flag, value, shown in (
            (
                "stochastic_depth",
                model.stochastic_depth,
                f"--stochastic_depth={model.stochastic_depth}",
            ),
            ("zero_init_residual", model.zero_init_residual, "--nozero_init_residual"),
        ):
            _require(
                value == defaults[flag],
                f"{shown} applies to a base trained from scratch only: with "
                f"--weights={model.weights} the base runs without stochastic depth and "
                "starts from its weights; drop the flag, or pass --weights=none",
            )


def check_augmentation(augmentation) -> None:
    """Checks the fields of an AugmentationConfig."""
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


def check_phases(phases) -> None:
    """Checks the fields of a PhasesConfig."""
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
    _check_schedule(phases)
    _check_optimizer(phases)


def _check_schedule(phases) -> None:
    _require_choice("lr_schedule", phases.lr_schedule, LR_SCHEDULES)
    _require_zero_or_more("warmup_epochs", phases.warmup_epochs, " (no warm-up)")
    for phase in (1, 2):
        epochs = getattr(phases, f"phase{phase}_epochs")
        _require(
            epochs == 0 or phases.warmup_epochs < epochs,
            f"--warmup_epochs={phases.warmup_epochs:g} must be shorter than each phase "
            f"(--phase{phase}_epochs={epochs}): the warm-up runs at the start of each phase; "
            "a fraction of an epoch is allowed",
        )
    why = " (the cosine schedule's floor, a share of the phase's learning rate)"
    _require_range("lr_min_fraction", phases.lr_min_fraction, 0.0, 1.0, high_open=True, why=why)
    _require(
        0.0 < phases.lr_decay_rate <= 1.0,
        f"--lr_decay_rate={phases.lr_decay_rate} must be in (0, 1]: the factor the "
        "exponential schedule multiplies the rate by every --lr_decay_epochs",
    )
    _require(
        phases.lr_decay_epochs > 0,
        f"--lr_decay_epochs={phases.lr_decay_epochs} must be positive",
    )


def _check_optimizer(phases) -> None:
    _require_choice("optimizer", phases.optimizer, OPTIMIZERS)
    _require_range("momentum", phases.momentum, 0.0, 1.0, high_open=True, why=" (SGD's momentum)")
    _require_zero_or_more("weight_decay", phases.weight_decay, " (no weight decay)")
    _require(
        phases.weight_decay == 0 or phases.optimizer != "adam",
        f"--weight_decay={phases.weight_decay:g} needs --optimizer=adamw (Adam with "
        "decoupled weight decay) or --optimizer=sgd; plain Adam has none",
    )
    why = " (0: hard labels)"
    _require_range("label_smoothing", phases.label_smoothing, 0.0, 1.0, high_open=True, why=why)


def check_runtime(runtime) -> None:
    """Checks the fields of a RuntimeConfig."""
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


def check_distribution(distribution) -> None:
    """Checks the fields of a DistributionConfig."""
    _require_choice("strategy", distribution.strategy, STRATEGIES)
    service = distribution.data_service
    host, _, port = service.removeprefix("grpc://").rpartition(":")
    _require(
        not service or (service.startswith("grpc://") and bool(host) and port.isdigit()),
        f"--data_service={service} must be grpc://HOST:PORT (a tf.data service dispatcher, "
        "e.g. from python -m effpipe.data_service), or empty",
    )


def check_outputs(outputs) -> None:
    """Checks the fields of an OutputsConfig."""
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


def check_across_slices(config) -> None:
    """The checks of a TrainConfig that span slices; each slice has checked its own fields."""
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
        config.model.head in POOLING_HEADS,
        f"--phase1_feature_cache=on needs --head=pooled or keras (the {config.model.head} "
        "head runs BatchNormalization and Dropout before pooling, so there are no pooled "
        "features to cache): pass --head=pooled, or --phase1_feature_cache=auto",
    )
