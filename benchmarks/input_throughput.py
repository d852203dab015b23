"""Host input throughput: effpipe's tf.data chain, stage by stage, against the notebook's.

    python -m benchmarks.input_throughput                        # shapes, batch 32
    python -m benchmarks.input_throughput --dataset=cifar100     # any trainer source
    python -m benchmarks.input_throughput --smoke                # a few seconds
    python -m benchmarks.input_throughput --dataset=folder:PATH --image_size=224
    python -m benchmarks.input_throughput --results_dir=results  # also results/<name>.json

With --dataset=folder:PATH (or tfds:NAME) it times image files instead:
effpipe's decoding first pass and cached passes against Keras'
image_dataset_from_directory and the notebook's flow_from_directory
(`benchmarks.file_input` says how). Otherwise, on in-memory sources:

Both pipelines read the same uint8 train split, loaded as the trainer loads it
(the trainer's data flags apply: --dataset, --data_dir, --source_size,
--shapes_*), and deliver --batch_size batches to a consumer that does nothing else:

  effpipe  the trainer's chain (pipeline.make_dataset, with the trainer's
           --deterministic, --data_threads and --autotune): source -> cache ->
           shuffle -> batch -> repeat -> prefetch of uint8 images, and without cache; for a
           breakdown, also source -> batch and source -> shuffle -> batch (no
           cache, no prefetch, default options);
  notebook the notebook's ImageDataGenerator(...).flow with its augmentation and
           one-hot labels, on the host in Python (benchmarks.notebook_replica).

Timing: one warm-up pass, then --repeats interleaved repeats of --num_batches
batches each, median. Prints a table; the last line is JSON with
effpipe_images_per_sec (the trainer's chain), notebook_images_per_sec and speedup.
Target: effpipe at least 50x the notebook pipeline.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from absl import flags

from benchmarks import file_input, harness, notebook_replica, records
from effpipe import cli_flags
from effpipe.data import pipeline, sources

flags.adopt_module_key_flags(cli_flags)
flags.adopt_module_key_flags(records)

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per pipeline; the median counts.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 200, "Batches consumed per timed repeat.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Seconds-long run on tiny data.")
_NOTEBOOK_BATCHES = flags.DEFINE_integer(
    "notebook_batches", 20, "With image files: batches the notebook's loader is timed on."
)
# Benchmarks run offline by default, on a CIFAR-sized share of shapes; any trainer
# source works (--dataset=cifar100 --data_dir=...).
flags.FLAGS.set_default("dataset", "shapes")
flags.FLAGS.set_default("shapes_train_examples", 10000)

TARGET_SPEEDUP = 50.0
TRAINER_CHAIN = "effpipe: epoch orders -> batch -> gather -> prefetch (the trainer's)"


def effpipe_stages(
    images, labels, batch_size: int, seed: int, options: pipeline.PipelineOptions
) -> dict[str, tf.data.Dataset]:
    """The trainer's chain, and two shorter chains for scale."""
    source = tf.data.Dataset.from_tensor_slices((images, labels))
    shuffled = source.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)

    trainer_chain = pipeline.make_dataset(
        images, labels, batch_size=batch_size, is_training=True, seed=seed, options=options
    )

    return {
        "effpipe: source -> batch": source.batch(batch_size, drop_remainder=True),
        "effpipe: source -> shuffle -> batch": shuffled.batch(batch_size, drop_remainder=True),
        TRAINER_CHAIN: trainer_chain,
    }


def consume_tf_data(dataset: tf.data.Dataset, num_batches: int):
    """One repeat: pulls `num_batches` batches inside a graph (no Python per batch)."""
    iterator = iter(dataset.repeat())

    @tf.function
    def consume():
        images_seen = tf.constant(0)
        for _ in tf.range(num_batches):
            images, _ = next(iterator)
            images_seen += tf.shape(images)[0]
        return images_seen

    return consume


def consume_generator(flow, num_batches: int):
    """One repeat of the notebook's generator: Python, batch by batch, as fit drives it."""

    def consume():
        for _ in range(num_batches):
            next(flow)

    return consume


def main(argv):
    del argv
    config = cli_flags.config_from_flags()
    repeats, num_batches = _REPEATS.value, _NUM_BATCHES.value
    harness.require_positive(repeats=repeats, num_batches=num_batches)
    if config.data.dataset.split(":")[0] in ("folder", "tfds"):
        if _SMOKE.value:
            repeats = 1
        notebook_batches = 1 if _SMOKE.value else _NOTEBOOK_BATCHES.value
        harness.require_positive(notebook_batches=notebook_batches)
        payload = file_input.run(config, repeats=repeats, notebook_batches=notebook_batches)
        harness.print_json_line(payload)
        records.record_benchmark(payload)
        return
    if _SMOKE.value:
        config = _smoke_config(config)
        repeats, num_batches = 2, 4
    batch_size = config.batch_size
    train = sources.load_configured_source(
        config.data,
        size=config.source_size,
        seed=config.seed,
        cache_root=harness.cache_root(config),
    ).train
    print(
        f"input_throughput: {config.data.dataset}, {len(train)} train images "
        f"{train.images.shape[1]}x{train.images.shape[2]} uint8, batch {batch_size}, "
        f"median of {repeats} repeats x {num_batches} batches"
    )

    candidates = [
        harness.Candidate(name, consume_tf_data(dataset, num_batches), batch_size * num_batches)
        for name, dataset in effpipe_stages(
            train.images,
            train.labels,
            batch_size,
            config.seed,
            pipeline.pipeline_options_of(config.runtime),
        ).items()
    ]
    flow = notebook_replica.make_image_generator().flow(
        train.images,
        notebook_replica.one_hot(train.labels, int(train.labels.max()) + 1),
        batch_size=batch_size,
        seed=config.seed,
    )
    notebook_name = "notebook: ImageDataGenerator.flow (the notebook's augmentation)"
    candidates.append(
        harness.Candidate(
            notebook_name, consume_generator(flow, num_batches), batch_size * num_batches
        )
    )
    timings = harness.time_interleaved(
        candidates, warmup_steps=1, repeats=repeats, steps_per_repeat=1
    )
    notebook_rate = timings[notebook_name]["items_per_sec"]
    harness.print_table(
        ["pipeline", "images/s", "x notebook"],
        [
            [name, t["items_per_sec"], t["items_per_sec"] / notebook_rate]
            for name, t in timings.items()
        ],
    )
    effpipe_rate = timings[TRAINER_CHAIN]["items_per_sec"]
    speedup = effpipe_rate / notebook_rate
    print(
        f"target: effpipe >= {TARGET_SPEEDUP:g}x the notebook pipeline: "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'} ({speedup:,.1f}x)"
    )
    payload = {
        "benchmark": "input_throughput",
        "dataset": config.data.dataset,
        "train_images": len(train),
        "batch_size": batch_size,
        "repeats": repeats,
        "num_batches": num_batches,
        "effpipe_images_per_sec": effpipe_rate,
        "notebook_images_per_sec": notebook_rate,
        "speedup": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "stages_images_per_sec": {name: t["items_per_sec"] for name, t in timings.items()},
    }
    harness.print_json_line(payload)
    records.record_benchmark(payload)


def _smoke_config(config):
    return config.replace(
        dataset="shapes", shapes_train_examples=200, shapes_test_examples=10, batch_size=8
    )


if __name__ == "__main__":
    harness.run_main("benchmarks.input_throughput", main)
