"""What each phase fits on: the splits, the validation images, the training streams.

Phase 1 and 2 fit on endless seeded streams of the training images, a fresh one per
`fit`, starting at the phase's initial epoch (each epoch's order is drawn from the
seed and the epoch: a resumed run reads nothing of the epochs before). Phase 1 on
the feature cache streams features instead (`phase1_features`), in the same order.
"""

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from effpipe import network, run_dir
from effpipe.config import TrainConfig
from effpipe.data import pipeline, sources, splits
from effpipe.errors import UsageError
from effpipe.training import distribution as distribution_lib


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's data, made once: the source, its splits, and what the phases read.

    Attributes:
      source, train_split, test_split, evaluated_on: what `load_data` returns.
      validation_split: its validation split in whole batches (`whole_batches`).
      validation_dataset: the batched validation images, one pass.
      make_training_stream: (phase, initial_epoch) -> the endless training stream
        from epoch `initial_epoch` on.
    """

    source: object
    train_split: object
    validation_split: object
    test_split: object
    evaluated_on: str
    steps_per_epoch: int
    validation_dataset: tf.data.Dataset
    make_training_stream: Callable[[int, int], object]


def prepare_data(
    config: TrainConfig, distribution: distribution_lib.Distribution, workdir: str
) -> RunData:
    """Loads the source and splits, and makes the validation dataset and the
    training streams' factory (an epoch is `steps_per_epoch` steps).

    Each of several workers decodes and trains on its own equal shard
    (`sources.worker_share`), batch_size / workers images of it per step; through a
    tf.data service they all read the whole split, in one job. Decoded images are
    cached under --cache_dir, or WORKDIR/cache/images.

    Raises:
      UsageError: see `load_data`; a --data_service whose dispatcher does not answer.
    """
    if config.distribution.data_service:
        # Before any decoding: a dispatcher that is not there would stall the first step.
        network.check_dispatcher_answers(config.distribution.data_service)
    workers = distribution.num_workers
    sharded = workers > 1 and not config.distribution.data_service
    cache_root = run_dir.image_cache_root(workdir, config.data.cache_dir)
    shard = (workers, distribution.worker_index) if sharded else (1, 0)
    source, train_split, validation_split, test_split, evaluated_on = load_data(
        config, cache_root, workers=shard
    )
    validation_split = whole_batches(validation_split, config.batch_size)
    options = pipeline.pipeline_options_of(config.runtime)
    # A worker's shard is its share already; the whole split is shared by all.
    share = len(train_split) if sharded else len(train_split) // workers
    steps_per_epoch = share // (config.batch_size // workers)
    stream_arguments = (config, distribution, workdir, train_split, options, steps_per_epoch)
    return RunData(
        source=source,
        train_split=train_split,
        validation_split=validation_split,
        test_split=test_split,
        evaluated_on=evaluated_on,
        steps_per_epoch=steps_per_epoch,
        validation_dataset=make_validation_dataset(config, distribution, validation_split, options),
        make_training_stream=functools.partial(make_training_stream, *stream_arguments),
    )


def whole_batches(validation_split, batch_size: int):
    """The validation examples of its whole batches, when it has one: a last, smaller
    batch would be a second shape, for which XLA compiles the validation step again.
    The final evaluation keeps every example (it pads its last batch)."""
    whole = len(validation_split) // batch_size * batch_size
    if not 0 < whole < len(validation_split):
        return validation_split
    logging.info(
        "validation on %d of the %d held-out images (whole batches of %d: one compiled shape)",
        whole,
        len(validation_split),
        batch_size,
    )
    return validation_split.subset(np.arange(whole))


def load_data(config: TrainConfig, cache_root: str, *, workers: tuple[int, int] = (1, 0)):
    """(source, train, validation and evaluated splits, "test" or "validation"),
    checked against the batch size and logged; `workers` as for
    `sources.load_configured_source`.

    Raises:
      UsageError: the batch is larger than the training split.
    """
    source = sources.load_configured_source(
        config.data,
        size=config.source_size,
        seed=config.seed,
        cache_root=cache_root,
        workers=workers,
    )
    train_split, validation_split, test_split, evaluated_on = splits.configured_splits(
        config.data, source, seed=config.seed
    )
    if source.test is None:
        logging.warning("%s has no test split: the final evaluation uses validation", source.name)
    if len(train_split) < config.batch_size:
        raise UsageError(
            f"--batch_size={config.batch_size} is larger than the {len(train_split)} "
            "training examples: lower it"
        )
    message = "data %s: %d train, %d validation, %d %s examples, %d classes, source %dx%d uint8"
    counts = len(train_split), len(validation_split), len(test_split), evaluated_on
    logging.info(message, source.name, *counts, source.num_classes, *source.source_image_size)
    return source, train_split, validation_split, test_split, evaluated_on


def make_validation_dataset(config, distribution, validation_split, pipeline_options):
    """The batched validation images, one pass, sharded by batch over workers."""
    dataset = pipeline.make_dataset(
        validation_split, batch_size=config.batch_size, is_training=False, options=pipeline_options
    )
    if not distribution.is_distributed:
        return dataset
    # Keras splits each validation batch over the replicas; several workers take every
    # other batch (DATA: every worker has the validation keys in memory).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def make_training_stream(
    config: TrainConfig,
    distribution: distribution_lib.Distribution,
    workdir: str,
    train_split,
    pipeline_options,
    steps_per_epoch: int,
    phase: int,
    initial_epoch: int,
):
    """The endless training stream of `phase` for `fit`, from `initial_epoch` (counted
    over both phases) on, distributed over the replicas under a strategy; `workdir`
    names the data service's job."""
    service = None
    if config.distribution.data_service:
        # Workers of one run share one job per phase start; another run (another
        # directory) or another start gets its own.
        run_key = zlib.crc32(os.path.abspath(workdir).encode())
        job_name = f"effpipe-{run_key:08x}-phase{phase}-from{initial_epoch}"
        service = pipeline.DataService(config.distribution.data_service, job_name)

    # Each local replica takes one batch per step: an epoch of a worker's stream
    # holds the batches of steps_per_epoch steps, so its epochs are fit's. A
    # service's job, shared by the workers, passes over all the examples each epoch.
    local_replicas = distribution.num_replicas // distribution.num_workers
    batches_per_epoch = None if service else steps_per_epoch * local_replicas

    def stream(batch_size, shard):
        # train_split is this worker's shard already (`prepare_data`), ordered with
        # the worker's own seed; through a service the workers share one job.
        return pipeline.make_dataset(
            train_split,
            batch_size=batch_size,
            is_training=True,
            seed=config.seed + (0 if service else shard[1]),
            initial_epoch=initial_epoch,
            batches_per_epoch=batches_per_epoch,
            options=pipeline_options,
            data_service=service,
        )

    return distribution_lib.distribute_training_stream(distribution, config.batch_size, stream)
