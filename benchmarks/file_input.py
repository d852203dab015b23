"""Input throughput on image files: effpipe's first and cached passes against Keras'.

    python -m benchmarks.photo_folder --path=/tmp/photos --num_photos=2000
    python -m benchmarks.input_throughput --dataset=folder:/tmp/photos --image_size=224

Run by `benchmarks.input_throughput` when --dataset names files (folder:PATH or
tfds:NAME). In one process, interleaved repeat by repeat, each a whole pass over the
train images at --source_size (0: the model resolution, --image_size), batches of
--batch_size delivered to a consumer that does nothing else:

  effpipe first pass   the trainer's decoding pass: list, read and decode in
                       parallel (fused crop + DCT-scaled JPEG decode), write the
                       decoded cache to a fresh folder (effpipe.data.cache)
  effpipe cached pass  the trainer's training stream over that cache: shuffle
                       positions -> batch -> read the rows -> prefetch
                       (effpipe.data.pipeline), CACHED_PASSES passes back to back as
                       a run's epochs read them (one pass of 2,000 photos lasts a
                       tenth of a second: too short to time alone)
  effpipe reopen       a second run's opening of that cache: the manifest read and
                       every row checked against its fingerprint (effpipe.data.
                       cache_files), which the rerun pays once before training
  tf.data ceiling      the same decoded images (up to CEILING_IMAGES of them) in an
                       array in memory, read as the cached pass reads its file:
                       range -> shuffle -> batch -> map(gather) -> prefetch, so the
                       only difference left is where the rows lie
  decode ceiling       the train files read and decoded in full (tf.io.decode_image
                       in a parallel map) and nothing else: no resize, no write. A
                       first pass that decodes every photo in full cannot beat it
  keras                keras.utils.image_dataset_from_directory on the same files at
                       the same size and batch, with the same tf.data threads
  notebook             the notebook's ImageDataGenerator.flow_from_directory (Python,
                       PIL), over --notebook_batches batches only: it is slow

Prints a table and, last, one JSON line with first_pass_images_per_sec,
cached_images_per_sec, reopen_images_per_sec, decode_ceiling_images_per_sec, keras_images_per_sec,
notebook_images_per_sec, speedup_first_pass, speedup_cached and peak_rss_mb (this
process's peak resident memory, all pipelines included).
"""

import dataclasses
import os
import resource
import shutil
import statistics
import tempfile
import time

import keras
import tensorflow as tf

from benchmarks import harness, notebook_replica
from effpipe.data import pipeline, sources

# The files Keras' image_dataset_from_directory reads, which the decode ceiling reads too.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# Passes of the training stream timed together as one repeat of the cached row.
CACHED_PASSES = 3
# Images the tf.data ceiling row holds in memory.
CEILING_IMAGES = 2000
# The targets, measured in this benchmark (never in tests).
TARGET_FIRST_PASS_SPEEDUP = 1.0
TARGET_CACHED_SPEEDUP = 10.0


@dataclasses.dataclass
class _Pass:
    """What one repeat of a candidate did: seconds and images."""

    seconds: float
    images: int


def run(config, *, repeats: int, notebook_batches: int) -> dict:
    """Times the candidates over `repeats` interleaved repeats; prints; returns the JSON."""
    options = pipeline.pipeline_options_of(config.runtime)
    size, batch_size = config.source_size, config.batch_size
    scratch = tempfile.mkdtemp(prefix="effpipe-input-benchmark-")
    names = ("first", "cached", "reopen", "ceiling", "decode", "keras", "notebook")
    samples = {name: [] for name in names}
    try:
        # Warm-up: one of each, untimed (tracing, the page cache of the files).
        for repeat in range(repeats + 1):
            cache_root = os.path.join(scratch, f"cache-{repeat}")
            first, train = _first_pass(config, cache_root)
            stream = pipeline.make_dataset(
                train, batch_size=batch_size, is_training=True, seed=config.seed, options=options
            )
            cached = _consume(stream.take(CACHED_PASSES * (len(train) // batch_size)))
            reopen, _ = _first_pass(config, cache_root)
            ceiling = _consume(_ceiling_dataset(train, batch_size, config.seed, options))
            decode = _consume(_decode_dataset(config, batch_size, options))
            keras_pass = _consume(_keras_dataset(config, options))
            notebook = _notebook_pass(config, notebook_batches)
            shutil.rmtree(cache_root)
            if repeat:
                passes = (first, cached, reopen, ceiling, decode, keras_pass, notebook)
                for name, result in zip(names, passes):
                    samples[name].append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rates = {name: _median_rate(passes) for name, passes in samples.items()}
    rows = [
        ["effpipe first pass (decode -> disk cache)", rates["first"]],
        ["effpipe cached pass (the training stream)", rates["cached"]],
        ["effpipe reopen (manifest + every row verified)", rates["reopen"]],
        ["tf.data ceiling (decoded array in memory)", rates["ceiling"]],
        ["decode ceiling (read + full decode, nothing else)", rates["decode"]],
        ["keras image_dataset_from_directory", rates["keras"]],
        ["notebook ImageDataGenerator.flow_from_directory", rates["notebook"]],
    ]
    harness.print_table(
        ["pipeline", "images/s", "x keras"], [[n, r, r / rates["keras"]] for n, r in rows]
    )
    result = {
        "benchmark": "input_throughput",
        "dataset": config.data.dataset,
        "train_images": len(train),
        "image_size": size,
        "source_crop": config.data.source_crop,
        "batch_size": batch_size,
        "repeats": repeats,
        "first_pass_images_per_sec": rates["first"],
        "cached_images_per_sec": rates["cached"],
        "reopen_images_per_sec": rates["reopen"],
        "tf_data_ceiling_images_per_sec": rates["ceiling"],
        "decode_ceiling_images_per_sec": rates["decode"],
        "keras_images_per_sec": rates["keras"],
        "notebook_images_per_sec": rates["notebook"],
        "speedup_first_pass": rates["first"] / rates["keras"],
        "speedup_cached": rates["cached"] / rates["keras"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for name, target in (
        ("first_pass", TARGET_FIRST_PASS_SPEEDUP),
        ("cached", TARGET_CACHED_SPEEDUP),
    ):
        speedup = result[f"speedup_{name}"]
        print(
            f"target: {name} >= {target:g}x keras: "
            f"{'met' if speedup >= target else 'MISSED'} ({speedup:.2f}x)"
        )
    return result


def _first_pass(config, cache_root: str):
    """The trainer's first pass into a fresh disk cache: (_Pass, the train split)."""
    data = dataclasses.replace(config.data, cache="disk", cache_dir=cache_root)
    start = time.perf_counter()
    source = sources.load_configured_source(
        data, size=config.source_size, seed=config.seed, cache_root=cache_root
    )
    seconds = time.perf_counter() - start
    decoded = sum(len(split) for split in (source.train, source.test, source.validation) if split)
    return _Pass(seconds, decoded), source.train


def _consume(dataset: tf.data.Dataset) -> _Pass:
    """One pass over a finite batched dataset, counted inside a graph traced before
    the clock starts."""

    @tf.function
    def count():
        images = tf.constant(0)
        for batch, _ in dataset:
            images += tf.shape(batch)[0]
        return images

    traced = count.get_concrete_function()
    start = time.perf_counter()
    images = int(traced())
    return _Pass(time.perf_counter() - start, images)


def _ceiling_dataset(train, batch_size: int, seed: int, options) -> tf.data.Dataset:
    """Decoded images from an array in memory, read as the cached pass reads its rows
    (shuffled positions, a batch gathered at a time): no file, no decode."""
    count = min(len(train), CEILING_IMAGES)
    images, labels = tf.constant(train.load_images(count)), tf.constant(train.labels[:count])
    dataset = tf.data.Dataset.range(count).shuffle(count, seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=True).map(
        lambda positions: (tf.gather(images, positions), tf.gather(labels, positions)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(pipeline.tf_data_options(options))


def _decode_dataset(config, batch_size: int, options) -> tf.data.Dataset:
    """The train files, each read and decoded in full and reduced to its height: the
    decoding work of a first pass (or of Keras' loader) without its resize or writes."""
    paths = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(_train_folder(config))
        for name in names
        if name.lower().endswith(IMAGE_SUFFIXES)
    )
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: tf.shape(
            tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        )[0],
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return (
        dataset.batch(batch_size)
        .map(lambda heights: (heights, heights))
        .with_options(pipeline.tf_data_options(options))
    )


def _train_folder(config) -> str:
    dataset = config.data.dataset
    if not dataset.startswith("folder:"):
        raise SystemExit(
            "input_throughput: the Keras and notebook loaders read folders; for "
            f"{dataset} prepare a folder (python -m benchmarks.photo_folder)"
        )
    return os.path.join(dataset.removeprefix("folder:"), "train")


def _keras_dataset(config, options) -> tf.data.Dataset:
    """image_dataset_from_directory as a user calls it, at the run's size and batch."""
    dataset = keras.utils.image_dataset_from_directory(
        _train_folder(config),
        image_size=(config.source_size, config.source_size),
        batch_size=config.batch_size,
        seed=config.seed,
        crop_to_aspect_ratio=config.data.source_crop == "centre",
        verbose=False,
    )
    # The same tf.data threads (--data_threads) and autotuning as effpipe's stream.
    return dataset.with_options(pipeline.tf_data_options(options))


def _notebook_pass(config, num_batches: int) -> _Pass:
    flow = notebook_replica.make_image_generator().flow_from_directory(
        _train_folder(config),
        target_size=(config.source_size, config.source_size),
        batch_size=config.batch_size,
        seed=config.seed,
    )
    start = time.perf_counter()
    images = sum(len(next(flow)[0]) for _ in range(num_batches))
    return _Pass(time.perf_counter() - start, images)


def _median_rate(passes: list[_Pass]) -> float:
    return statistics.median(one.images / one.seconds for one in passes)
