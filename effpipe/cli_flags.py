"""The shared absl flags, grouped by section, and their conversion to a TrainConfig.

Binaries import this module, call `flags.adopt_module_key_flags(cli_flags)` so
`--helpshort` lists these flags, and build the config with `config_from_flags()`.
Each flag is a field of `config.TrainConfig` and its section here is the field's
slice (`config.SECTION_TITLES`), which `--helpshort` and `--print_config` show. The
command-line helpers of `effpipe.cli_usage` are reached through this module. It
imports neither TensorFlow nor Keras: a bad flag fails in a second.
"""

import datetime
import sys

from absl import flags

from effpipe import config as config_lib
from effpipe import variants

# The binaries' one import for their command line (effpipe.cli_usage).
from effpipe.cli_usage import (  # noqa: F401 (re-exported)
    exit_with_usage_error,
    make_flags_parser,
    refuse_arguments,
)

_DEFAULTS = config_lib.TrainConfig().to_flat()

# --- Data. ---
flags.DEFINE_string(
    "dataset",
    _DEFAULTS["dataset"],
    "Data source: cifar100 (tensorflow-datasets), tfds:NAME[/CONFIG][@VERSION] (any "
    "tensorflow-datasets image-classification dataset, e.g. tfds:tf_flowers), "
    "folder:PATH (PATH/train/<class>/ images and optional PATH/test/<class>/) or shapes "
    "(synthetic, offline).",
)
flags.DEFINE_string(
    "data_dir",
    _DEFAULTS["data_dir"],
    "tensorflow-datasets data directory for cifar100 and tfds: (default ~/tensorflow_datasets).",
)
flags.DEFINE_integer(
    "source_size",
    _DEFAULTS["source_size"],
    "Side in pixels images are decoded to and stored at on the host; the device resizes "
    "them to the model resolution. 0: 32 for cifar100 and shapes, the model resolution "
    "for folder and tfds sources (a tfds dataset of one smaller image size keeps it).",
)
flags.DEFINE_enum(
    "source_crop",
    _DEFAULTS["source_crop"],
    config_lib.SOURCE_CROPS,
    "How a photo that is not square reaches --source_size: resize (squeeze the whole "
    "photo, as Keras' image_dataset_from_directory does) or centre (crop the centre "
    "square first: no distortion, the edges lost).",
)
flags.DEFINE_enum(
    "cache",
    _DEFAULTS["cache"],
    config_lib.CACHE_MODES,
    "Where decoded images are kept after the first pass: memory, disk (files under "
    "--cache_dir, reused by later runs on the same files), off (decode every pass), or "
    "auto (memory when a split's decoded images fit in --cache_memory_mb, else disk).",
)
flags.DEFINE_string(
    "cache_dir",
    _DEFAULTS["cache_dir"],
    "Folder of the decoded-image cache, shared between runs; empty: WORKDIR/cache/images.",
)
flags.DEFINE_integer(
    "cache_memory_mb",
    _DEFAULTS["cache_memory_mb"],
    "With --cache=auto, the largest split (decoded, in MB) kept in memory.",
)
flags.DEFINE_enum(
    "on_bad_image",
    _DEFAULTS["on_bad_image"],
    config_lib.BAD_IMAGE_POLICIES,
    "An image file that cannot be decoded (truncated, empty, not an image): fail (stop, "
    "naming the file) or skip (leave it out; the count and first paths are logged and "
    "in metrics.json; with --cache=off each split is decoded once first to find them).",
)
flags.DEFINE_float(
    "validation_fraction",
    _DEFAULTS["validation_fraction"],
    "Share of the train split held out for validation, in (0, 1).",
)
flags.DEFINE_enum(
    "validation_selection",
    _DEFAULTS["validation_selection"],
    config_lib.VALIDATION_SELECTIONS,
    "random: a seeded random subset; last: the last examples in stored order (Keras "
    "validation_split, as the original notebook did).",
)
flags.DEFINE_integer(
    "shapes_num_classes",
    _DEFAULTS["shapes_num_classes"],
    "Kinds of shape in --dataset=shapes (2..10).",
)
flags.DEFINE_integer(
    "shapes_train_examples",
    _DEFAULTS["shapes_train_examples"],
    "Train examples generated for --dataset=shapes (validation is split off them).",
)
flags.DEFINE_integer(
    "shapes_test_examples",
    _DEFAULTS["shapes_test_examples"],
    "Test examples generated for --dataset=shapes.",
)

# --- Model. ---
flags.DEFINE_enum("variant", _DEFAULTS["variant"], list(variants.VARIANTS), "EfficientNet variant.")
flags.DEFINE_integer(
    "image_size",
    _DEFAULTS["image_size"],
    "Model resolution in pixels; 0 means the variant's native size (456 for b5).",
)
flags.DEFINE_string(
    "weights",
    _DEFAULTS["weights"],
    "imagenet (Keras download), none (random initialisation) or the PATH of a Keras "
    "weights file of the variant's no-top base.",
)
flags.DEFINE_enum(
    "head",
    _DEFAULTS["head"],
    (*config_lib.HEADS, *config_lib.HEAD_ALIASES),
    "pooled: GAP -> BN -> Dropout -> Dense; notebook: BN -> Dropout -> GAP -> Dense "
    "(the original notebook's order; seed is an older name of it); keras: GAP -> "
    "Dropout -> Dense (Keras' own EfficientNet top).",
)
flags.DEFINE_float("dropout", _DEFAULTS["dropout"], "Dropout rate of the head.")
flags.DEFINE_float(
    "stochastic_depth",
    _DEFAULTS["stochastic_depth"],
    "With --weights=none: the rate at which the last block drops its residual branch "
    "in training, earlier blocks linearly less (Keras' EfficientNet: 0.2); 0 turns it "
    "off. A pretrained base runs without it.",
)
flags.DEFINE_bool(
    "zero_init_residual",
    _DEFAULTS["zero_init_residual"],
    "With --weights=none: start each residual block's last BatchNormalization at scale "
    "0, so every block starts as the identity and training from scratch takes off "
    "sooner (timm's zero_init_last).",
)

# --- Augmentation: on the device, fused with the resize (effpipe.model.augment). ---
flags.DEFINE_bool(
    "augment",
    _DEFAULTS["augment"],
    "Random affine augmentation of training images, sampled straight at the model "
    "resolution inside the compiled train step; evaluation is never augmented.",
)
flags.DEFINE_float(
    "rotation_degrees", _DEFAULTS["rotation_degrees"], "Rotation drawn from [-r, r] degrees."
)
flags.DEFINE_float(
    "shift_fraction",
    _DEFAULTS["shift_fraction"],
    "Shifts drawn from [-s, s] times the image height and width.",
)
flags.DEFINE_float(
    "shear_degrees",
    _DEFAULTS["shear_degrees"],
    "Shear angle drawn from [-s, s] degrees. The default is the original notebook's "
    "shear_range=0.2, which ImageDataGenerator reads as degrees: a negligible shear "
    "(0.2 radians would be 11.5).",
)
flags.DEFINE_float(
    "zoom_fraction",
    _DEFAULTS["zoom_fraction"],
    "Row and column zoom drawn independently from [1 - z, 1 + z].",
)
flags.DEFINE_bool(
    "horizontal_flip", _DEFAULTS["horizontal_flip"], "Mirror half of the training images."
)
flags.DEFINE_enum(
    "fill_mode",
    _DEFAULTS["fill_mode"],
    config_lib.FILL_MODES,
    "Samples outside the source: nearest (repeat the edge), reflect or constant (0).",
)

# --- Batch size and seed. ---
flags.DEFINE_integer("batch_size", _DEFAULTS["batch_size"], "Global batch size, in images.")
flags.DEFINE_integer("seed", _DEFAULTS["seed"], "Seeds data order, splits and initialisation.")

# --- Training recipe. ---
flags.DEFINE_integer("phase1_epochs", _DEFAULTS["phase1_epochs"], "Epochs with the base frozen.")
flags.DEFINE_float(
    "phase1_learning_rate", _DEFAULTS["phase1_learning_rate"], "Adam learning rate of phase 1."
)
flags.DEFINE_integer(
    "phase2_epochs", _DEFAULTS["phase2_epochs"], "Epochs with the top blocks unfrozen."
)
flags.DEFINE_float(
    "phase2_learning_rate", _DEFAULTS["phase2_learning_rate"], "Adam learning rate of phase 2."
)
flags.DEFINE_integer(
    "unfreeze_blocks",
    _DEFAULTS["unfreeze_blocks"],
    "Blocks of the base unfrozen in phase 2, counted from the top (b0 has 16, b5 39), "
    "plus the top conv; BatchNormalization layers always stay frozen.",
)
flags.DEFINE_integer(
    "base_batch_size",
    _DEFAULTS["base_batch_size"],
    "The batch size the learning rates were tuned for: when set, both phases' "
    "learning rates are multiplied by --batch_size / --base_batch_size (the linear "
    "scaling rule); 0 leaves them as given.",
)
flags.DEFINE_enum(
    "lr_schedule",
    _DEFAULTS["lr_schedule"],
    config_lib.LR_SCHEDULES,
    "Learning rate over each phase's own epochs, from Keras' schedules: constant (the "
    "notebook's), cosine (CosineDecay to --lr_min_fraction of the rate at the phase's "
    "end) or exponential (ExponentialDecay: times --lr_decay_rate every "
    "--lr_decay_epochs, in steps).",
)
flags.DEFINE_float(
    "warmup_epochs",
    _DEFAULTS["warmup_epochs"],
    "Linear warm-up from 0 to the phase's learning rate over its first epochs (a "
    "fraction allowed), in each phase, before the schedule; 0: none.",
)
flags.DEFINE_float(
    "lr_min_fraction",
    _DEFAULTS["lr_min_fraction"],
    "--lr_schedule=cosine: the rate it ends at, as a share of the phase's rate.",
)
flags.DEFINE_float(
    "lr_decay_rate",
    _DEFAULTS["lr_decay_rate"],
    "--lr_schedule=exponential: the factor per --lr_decay_epochs (0.97 every 2.4 epochs "
    "is the EfficientNet paper's).",
)
flags.DEFINE_float(
    "lr_decay_epochs",
    _DEFAULTS["lr_decay_epochs"],
    "--lr_schedule=exponential: epochs between two decays (a staircase).",
)
flags.DEFINE_enum(
    "optimizer",
    _DEFAULTS["optimizer"],
    config_lib.OPTIMIZERS,
    "adam (the notebook's), adamw (Adam with decoupled --weight_decay) or sgd (with "
    "--momentum, and --weight_decay if set).",
)
flags.DEFINE_float("momentum", _DEFAULTS["momentum"], "--optimizer=sgd: its momentum.")
flags.DEFINE_float(
    "weight_decay",
    _DEFAULTS["weight_decay"],
    "Decoupled weight decay of adamw and sgd (Keras: each step subtracts "
    "learning_rate * weight_decay * weight), on kernels only: BatchNormalization and "
    "bias variables are excluded, as the published EfficientNet recipes do. 0: none.",
)
flags.DEFINE_float(
    "label_smoothing",
    _DEFAULTS["label_smoothing"],
    "Label smoothing of the training loss, in [0, 1): the target puts 1 - s + s/K on "
    "the true class of K; 0: hard labels.",
)

flags.DEFINE_enum(
    "phase1_feature_cache",
    _DEFAULTS["phase1_feature_cache"],
    config_lib.FEATURE_CACHE_MODES,
    "Compute the frozen base's pooled features of the train and validation images "
    "once (saved under WORKDIR/cache/) and train phase 1's head on them. auto: on "
    "with --noaugment, --head=pooled and a pretrained base (with --weights=none the "
    "base's stochastic depth varies the features); on: required, refused with "
    "augmentation or the notebook head; off: every phase-1 epoch runs the whole model.",
)

# --- Performance and reproducibility. ---
flags.DEFINE_bool(
    "mixed_precision",
    _DEFAULTS["mixed_precision"],
    "Mixed precision: 16-bit float compute, float32 variables (--mixed_precision_dtype).",
)
flags.DEFINE_enum(
    "mixed_precision_dtype",
    _DEFAULTS["mixed_precision_dtype"],
    config_lib.MIXED_PRECISION_DTYPES,
    "The 16-bit float of --mixed_precision. auto: float16 with dynamic loss scaling "
    "on GPU, bfloat16 on CPU and TPU; float16: with loss scaling, anywhere (on a CPU "
    "it exercises the GPU's loss-scaling path, slowly); bfloat16: no loss scaling, "
    "needs an Ampere or newer GPU.",
)
flags.DEFINE_enum(
    "xla",
    _DEFAULTS["xla"],
    config_lib.XLA_MODES,
    "Compile the train step with XLA; auto: on for GPU/TPU, off on CPU.",
)
flags.DEFINE_integer(
    "steps_per_execution",
    _DEFAULTS["steps_per_execution"],
    "Train steps per compiled call (Keras' steps_per_execution): fewer round trips "
    "from Python to the device. 0 (auto): as many as divide an epoch, up to 32 for "
    "the phase-1 head on cached features and 8 for the whole model on a GPU or TPU; "
    "1 on CPU and while profiling. Must divide the steps of an epoch.",
)
flags.DEFINE_bool(
    "deterministic",
    _DEFAULTS["deterministic"],
    "Deterministic ops and data order: repeatable runs, somewhat slower.",
)
flags.DEFINE_integer(
    "data_threads",
    _DEFAULTS["data_threads"],
    "Private thread pool size of the input pipeline; 0 uses TensorFlow's shared pool.",
)
flags.DEFINE_bool("autotune", _DEFAULTS["autotune"], "Let tf.data tune parallelism and buffers.")
flags.DEFINE_bool(
    "debug_numerics",
    _DEFAULTS["debug_numerics"],
    "TensorFlow's numeric checks: stop at the first op that makes a NaN or infinity "
    "and name it (much slower; for debugging a diverging run).",
)

# --- Distribution: replicas, machines and an input fleet (effpipe.training.distribution). ---
flags.DEFINE_enum(
    "strategy",
    _DEFAULTS["strategy"],
    config_lib.STRATEGIES,
    "tf.distribute strategy. auto: mirrored when more than one GPU is visible, else "
    "default (one device); mirrored: every local GPU; multi_worker: the machines of "
    "TF_CONFIG (set on each of them); tpu: the TPU of TPU_NAME, or a local one. "
    "--batch_size is the global batch and must divide by the replicas.",
)
flags.DEFINE_string(
    "data_service",
    _DEFAULTS["data_service"],
    "grpc://HOST:PORT of a tf.data service dispatcher (python -m effpipe.data_service): "
    "the training input pipeline runs on its workers. Empty: in this process.",
)

# --- Outputs. ---
flags.DEFINE_string(
    "profile_steps",
    _DEFAULTS["profile_steps"],
    "START,END: trace train steps START..END of each phase with TensorFlow's profiler "
    "(TensorBoard's Profile tab, under WORKDIR/tensorboard/); empty for none.",
)
flags.DEFINE_bool(
    "export",
    _DEFAULTS["export"],
    "Write WORKDIR/export/, the serving SavedModel that effpipe.predict and "
    "effpipe.evaluate use (a few seconds at the end of the run).",
)

FLAGS = flags.FLAGS


def config_from_flags() -> config_lib.TrainConfig:
    """Builds the validated TrainConfig from the parsed flags.

    Raises:
      UsageError: a flag value that the config refuses.
    """
    values = {name: FLAGS[name].value for name in config_lib.FIELD_SLICES}
    return config_lib.TrainConfig.from_flat(**values)


def flagfile_text(program: str, extra_flag_names: tuple[str, ...] = ()) -> str:
    """The resolved flags of this module (and `extra_flag_names`) as a flagfile.

    Every flag is written, defaults included, so the file reproduces the run even
    if a default changes later.
    """
    header = [
        f"# Resolved flags of a `python -m {program}` run, written "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"# Reproduce it: python -m {program} --flagfile=THIS_FILE",
    ]
    names = [flag.name for flag in FLAGS.get_flags_for_module(sys.modules[__name__])]
    lines = [FLAGS[name].serialize() for name in [*names, *extra_flag_names]]
    return "\n".join(header + [line for line in lines if line]) + "\n"
