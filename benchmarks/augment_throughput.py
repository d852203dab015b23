"""Augmentation throughput: effpipe's fused augment + resize against Keras' layer chain.

    python -m benchmarks.augment_throughput                 # 224 and 456 px, batch 32
    python -m benchmarks.augment_throughput --smoke         # a few seconds, tiny sizes
    python -m benchmarks.augment_throughput --results_dir=results  # also results/<name>.json

Every path turns the same uint8 batch of source images (--source_size, 32 px as
CIFAR-100), already on the device, into training images at the model resolution,
in the compute dtype of --mixed_precision (float32 without it), with the ranges of
the trainer's augmentation flags (defaults: the notebook's intended augmentation):

  fused             effpipe's AugmentResize layer in training mode: rotation, shift,
                    shear, independent x/y zoom and flip sampled straight at the
                    model resolution in one bilinear pass; what the trainer runs.
                    The layer always compiles its sampling with XLA.
  fused_uncompiled  the same operation (augment.affine_resize) left to TensorFlow's
                    kernels, without XLA: what the layer's own compilation saves.
  keras_chain       RandomFlip, RandomRotation, RandomTranslation, RandomZoom (fill
                    nearest, as the fused path) at the source size, then
                    tf.image.resize: augment, then interpolate again. No shear: the
                    notebook's 0.2 degrees is negligible.
  resize_only       tf.image.resize alone, no augmentation: the notebook's in-model
                    resize, for reference.

Each path runs in a step compiled with XLA (jit_compile=True) and in one that is
not; a path that does not compile is reported as such. Timing: warm-up calls
(tracing, compilation), then interleaved repeats, median. Prints a table and,
last, one JSON line with, per size, fused_images_per_sec and
keras_chain_images_per_sec (each the faster of its modes that compile), speedup
(their ratio) and xla_compiles per path.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from absl import flags

from benchmarks import harness, records
from effpipe import cli_flags, variants
from effpipe.config import MAX_IMAGE_SIZE
from effpipe.errors import UsageError
from effpipe.model import augment, factory
from effpipe.training import runtime

flags.adopt_module_key_flags(cli_flags)
flags.adopt_module_key_flags(records)
_SIZES = flags.DEFINE_list("sizes", ["224", "456"], "Model resolutions to time, in pixels.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3, "Untimed calls per candidate first.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per candidate; the median counts.")
_STEPS_PER_REPEAT = flags.DEFINE_integer("steps_per_repeat", 10, "Calls per timed repeat.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Seconds-long run at tiny sizes: checks that the benchmark works."
)

PATHS = ("fused", "fused_uncompiled", "keras_chain", "resize_only")
# Paths whose XLA compilation is reported; fused_uncompiled is fused without XLA.
COMPILED_PATHS = ("fused", "keras_chain", "resize_only")
MODES = {True: "step_xla", False: "step_not_compiled"}


def make_path(path: str, image_size: int, augmentation: augment.AugmentConfig, dtype: str):
    """One step of `path`: uint8 [B, S, S, 3] -> [B, image_size, image_size, 3] in `dtype`."""
    output_size = (image_size, image_size)
    if path == "fused":
        layer = augment.AugmentResize(image_size, augment=augmentation, seed=0, dtype=dtype)
        return lambda images: layer(images, training=True)
    if path == "fused_uncompiled":
        step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def fused_uncompiled(images):
            key = augment.make_key(0, step, 0)
            step.assign_add(1)
            parameters = augment.sample_parameters(key, tf.shape(images)[0], augmentation)
            return augment.affine_resize(
                images, parameters, output_size, augmentation.fill_mode, dtype=dtype
            )

        return fused_uncompiled
    if path == "keras_chain":
        fill_mode = augmentation.fill_mode
        chain = keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal"),
                # RandomRotation's factor is a fraction of a full turn.
                keras.layers.RandomRotation(
                    augmentation.rotation_degrees / 360.0, fill_mode=fill_mode
                ),
                keras.layers.RandomTranslation(
                    augmentation.shift_fraction, augmentation.shift_fraction, fill_mode=fill_mode
                ),
                keras.layers.RandomZoom(
                    (-augmentation.zoom_fraction, augmentation.zoom_fraction),
                    (-augmentation.zoom_fraction, augmentation.zoom_fraction),
                    fill_mode=fill_mode,
                ),
            ]
        )
        return lambda images: tf.cast(
            tf.image.resize(chain(tf.cast(images, tf.float32), training=True), output_size), dtype
        )
    return lambda images: tf.cast(tf.image.resize(tf.cast(images, tf.float32), output_size), dtype)


def compile_path(path, image_size, augmentation, dtype, images, xla: bool):
    """The traced (and with `xla`, XLA-compiled) step, or None if it does not compile."""
    function = tf.function(make_path(path, image_size, augmentation, dtype), jit_compile=xla)
    try:
        function(images).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError):
        # Ops without an XLA kernel (ImageProjectiveTransformV3) fail here.
        return None
    return function


def main(argv):
    del argv
    config = cli_flags.config_from_flags()
    sizes = _parse_sizes(_SIZES.value)
    batch_size, source_size = config.batch_size, config.source_size
    warmup_steps = _WARMUP_STEPS.value
    repeats, steps_per_repeat = _REPEATS.value, _STEPS_PER_REPEAT.value
    harness.require_positive(repeats=repeats, steps_per_repeat=steps_per_repeat)
    if _SMOKE.value:
        sizes, batch_size, warmup_steps, repeats, steps_per_repeat = [48], 4, 1, 2, 2
    # The trainer's augmentation flags give the ranges (--augment itself is moot here).
    augmentation = factory.augment_config(dataclasses.replace(config.augmentation, augment=True))
    setup = runtime.resolve_runtime(mixed_precision=config.runtime.mixed_precision, xla="auto")
    dtype = keras.DTypePolicy(setup.precision).compute_dtype
    print(
        f"augment_throughput on {setup.device}: batch {batch_size}, {source_size} px uint8 "
        f"source, {dtype} out, median of {repeats} repeats x {steps_per_repeat} steps"
    )
    images = tf.random.stateless_uniform(
        [batch_size, source_size, source_size, 3], seed=[0, 0], maxval=256,
        dtype=tf.int32,
    )  # fmt: skip
    images = tf.cast(images, tf.uint8)

    rows, report = [], {}
    for size in sizes:
        candidates, xla_compiles = [], {}
        for path in PATHS:
            # fused_uncompiled under step XLA would be the fused path again.
            for xla in (False,) if path == "fused_uncompiled" else (True, False):
                function = compile_path(path, size, augmentation, dtype, images, xla)
                if xla:
                    xla_compiles[path] = function is not None
                if function is not None:
                    candidates.append(
                        harness.Candidate(
                            f"{path}/{MODES[xla]}",
                            lambda function=function: function(images),
                            batch_size,
                        )
                    )
        timings = harness.time_interleaved(
            candidates,
            warmup_steps=warmup_steps,
            repeats=repeats,
            steps_per_repeat=steps_per_repeat,
        )

        def best(path, timings=timings):
            rates = [t["items_per_sec"] for n, t in timings.items() if n.startswith(path + "/")]
            return max(rates)

        fused, keras_chain = best("fused"), best("keras_chain")
        for path in PATHS:
            for xla, mode in MODES.items():
                if path == "fused_uncompiled" and xla:
                    continue
                timing = timings.get(f"{path}/{mode}")
                rate = timing["items_per_sec"] if timing else None
                rows.append(
                    [
                        size,
                        path,
                        mode if timing else f"{mode} (does not compile)",
                        rate,
                        timing["ms_per_step"] if timing else None,
                        rate / keras_chain if rate else None,
                    ]
                )
        report[str(size)] = {
            "fused_images_per_sec": fused,
            "keras_chain_images_per_sec": keras_chain,
            "speedup": fused / keras_chain,
            "xla_compiles": xla_compiles,
            "images_per_sec": {name: t["items_per_sec"] for name, t in timings.items()},
        }
    harness.print_table(["px", "path", "step", "images/s", "ms/step", "x keras_chain (best)"], rows)
    payload = {
        "benchmark": "augment_throughput",
        "device": setup.device,
        "dtype": dtype,
        "batch_size": batch_size,
        "source_size": source_size,
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
        "sizes": report,
    }
    harness.print_json_line(payload)
    records.record_benchmark(payload)


def _parse_sizes(values: list[str]) -> list[int]:
    """--sizes as pixels; UsageError for anything but integers in the trainer's range."""
    try:
        sizes = [int(value) for value in values]
    except ValueError:
        sizes = []
    if not sizes or not all(variants.MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE for size in sizes):
        raise UsageError(
            f"--sizes={','.join(values)} must be a comma-separated list of pixel sizes in "
            f"{variants.MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        )
    return sizes


if __name__ == "__main__":
    harness.run_main("benchmarks.augment_throughput", main)
