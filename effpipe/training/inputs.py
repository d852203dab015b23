"""What each phase fits on: the splits, the validation images, the training streams.

Phase 1 and 2 fit on endless seeded streams of the training images, a fresh one per
`fit`, with the epochs a resumed run already trained skipped
(`run_state.batches_to_skip`). Phase 1 on the feature cache fits the head model on
the base's pooled features instead (`cached_phase1_inputs`), streamed in the same
order.
"""

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from effpipe import config as config_lib
from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.data import pipeline, sources, splits
from effpipe.errors import UsageError
from effpipe.model import factory
from effpipe.training import callbacks, feature_cache, run_state
from effpipe.training import distribution as distribution_lib


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's data, made once: the source, its splits, and what the phases read.

    Attributes:
      source: the loaded source (class names, image size).
      train_split, validation_split, test_split: the examples of each split.
      evaluated_on: "test", or "validation" when the source has no test split.
      steps_per_epoch: training steps per epoch.
      validation_dataset: the batched validation images, one pass.
      make_training_stream: (phase, initial_epoch) -> the endless training stream,
        its first `initial_epoch` epochs skipped.
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
    config: TrainConfig,
    distribution: distribution_lib.Distribution,
    workdir: str,
) -> RunData:
    """Loads the source and splits, and makes the validation dataset and the
    training streams' factory.

    Training streams are endless (effpipe.data.pipeline says why); an epoch is
    `steps_per_epoch` steps. Each fit gets a fresh stream from the seed, so epoch k's
    batches do not depend on what ran before in this process (a resumed run sees
    the same ones). Each of several workers trains on its equal shard,
    batch_size / workers images of it per step.

    Decoded images are cached under --cache_dir, or WORKDIR/cache/images, which
    every worker of a multi-worker run shares, so they split its first pass
    (effpipe.data.cache).

    Raises:
      UsageError: see `load_data`; a --data_service whose dispatcher does not answer.
    """
    if config.distribution.data_service:
        # Before any decoding: a dispatcher that is not there would stall the first step.
        pipeline.check_dispatcher_answers(config.distribution.data_service)
    source, train_split, validation_split, test_split, evaluated_on = load_data(
        config,
        run_dir.image_cache_root(workdir, config.data.cache_dir),
        workers=(distribution.num_workers, distribution.worker_index),
    )
    options = pipeline.pipeline_options_of(config.runtime)
    workers = distribution.num_workers
    steps_per_epoch = (len(train_split) // workers) // (config.batch_size // workers)
    return RunData(
        source=source,
        train_split=train_split,
        validation_split=validation_split,
        test_split=test_split,
        evaluated_on=evaluated_on,
        steps_per_epoch=steps_per_epoch,
        validation_dataset=make_validation_dataset(config, distribution, validation_split, options),
        make_training_stream=functools.partial(
            make_training_stream,
            config,
            distribution,
            workdir,
            train_split,
            options,
            steps_per_epoch,
        ),
    )


def load_data(config: TrainConfig, cache_root: str, *, workers: tuple[int, int] = (1, 0)):
    """The source and its splits, checked against the batch size and logged.

    Args:
      config: the run configuration.
      cache_root: the folder of the decoded-image caches.
      workers: (count, index) of the run's workers (a shared --cache_dir's first
        pass is split between them).

    Returns:
      (source, train split, validation split, test split, the name of the split
      the final evaluation uses).

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
    logging.info(
        "data %s: %d train, %d validation, %d %s examples, %d classes, source %dx%d uint8",
        source.name,
        len(train_split),
        len(validation_split),
        len(test_split),
        evaluated_on,
        source.num_classes,
        *source.source_image_size,
    )
    return source, train_split, validation_split, test_split, evaluated_on


def make_validation_dataset(config, distribution, validation_split, pipeline_options):
    """The batched validation images, sharded by batch over several workers.

    Args:
      config: the run configuration.
      distribution: the run's strategy.
      validation_split: the validation examples.
      pipeline_options: the run's tf.data options.

    Returns:
      The validation dataset, one pass.
    """
    validation_dataset = pipeline.make_dataset(
        validation_split,
        batch_size=config.batch_size,
        is_training=False,
        seed=config.seed,
        options=pipeline_options,
    )
    if distribution.is_distributed:
        # Keras splits each validation batch over the replicas; several workers take
        # every other batch (DATA: every worker has the validation keys in memory).
        validation_options = tf.data.Options()
        validation_options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        validation_dataset = validation_dataset.with_options(validation_options)
    return validation_dataset


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
    """The endless training stream of a phase that starts at `initial_epoch`.

    Args:
      config: the run configuration.
      distribution: the run's strategy.
      workdir: the run directory (it names the data service's job).
      train_split: the training examples.
      pipeline_options: the run's tf.data options.
      steps_per_epoch: training steps per epoch.
      phase: the phase (1 or 2).
      initial_epoch: the epoch the phase starts at, counted over both phases.

    Returns:
      The stream for `fit`, its first `initial_epoch` epochs skipped (distributed
      over the replicas under a strategy).
    """
    service = None
    if config.distribution.data_service:
        # Workers of one run share one job per phase start; another run (another
        # directory) or another start gets its own.
        run_key = zlib.crc32(os.path.abspath(workdir).encode())
        service = pipeline.DataService(
            config.distribution.data_service,
            f"effpipe-{run_key:08x}-phase{phase}-from{initial_epoch}",
        )

    def stream(batch_size, shard):
        # Through a service the workers share one job instead of sharding.
        dataset = pipeline.make_dataset(
            train_split,
            batch_size=batch_size,
            is_training=True,
            seed=config.seed,
            options=pipeline_options,
            shard=(1, 0) if service else shard,
            data_service=service,
        )
        if service:
            # The service's order is its own: skipping would only discard batches.
            return dataset
        # The stream is endless and seeded: skipping the epochs already trained
        # gives a resumed run the batches an uninterrupted one sees (each local
        # replica takes one batch per step).
        local_replicas = distribution.num_replicas // distribution.num_workers
        return dataset.skip(
            run_state.batches_to_skip(initial_epoch, steps_per_epoch, local_replicas)
        )

    return distribution_lib.distribute_training_stream(distribution, config.batch_size, stream)


def cached_phase1_inputs(
    config: TrainConfig,
    setup,
    model,
    output_dir: str,
    train_split,
    validation_split,
    stop_on_signal: callbacks.StopOnSignal,
    steps_per_execution: int,
):
    """Phase 1 on cached features: the head model, compiled, and its two datasets.

    The features come from the file a previous start of this run saved, or are
    computed now (progress shown) and saved. The head model shares the full model's
    head layers and optimizer (the model must be compiled, and restored on resume),
    so fitting it trains the full model's head; its training stream is the images'
    stream over the features, in the same order (`pipeline.make_feature_dataset`).

    Args:
      config: the run configuration.
      setup: the resolved runtime (precision and XLA).
      model: the full model, compiled for phase 1 (and restored on resume).
      output_dir: where this process keeps the cache file.
      train_split: the training examples.
      validation_split: the validation examples.
      stop_on_signal: the run's StopOnSignal, a callback of the feature passes.
      steps_per_execution: phase 1's steps per compiled call.

    Returns:
      (head model, endless training dataset, validation dataset).
    """
    feature_model = feature_cache.make_feature_model(model)
    # Compiled for the run's XLA setting, as the phase-1 step computes the features.
    feature_model.compile(jit_compile=setup.xla)
    options = pipeline.pipeline_options_of(config.runtime)

    def compute(split):
        images = pipeline.make_dataset(
            split,
            batch_size=config.batch_size,
            is_training=False,
            options=options,
        )
        return feature_model.predict(
            images, verbose=callbacks.keras_verbosity(), callbacks=[stop_on_signal]
        )

    path = os.path.join(output_dir, feature_cache.CACHE_FILE)
    features = feature_cache.load_or_compute(
        path,
        _feature_fingerprint(config, setup, train_split, validation_split),
        lambda: compute(train_split),
        lambda: compute(validation_split),
    )
    feature_cache.log_features(features, path)
    head_model = feature_cache.make_head_model(model)
    factory.compile_model(
        head_model,
        config.learning_rate(1),
        jit_compile=setup.xla,
        optimizer=model.optimizer,
        steps_per_execution=steps_per_execution,
        label_smoothing=config.phases.label_smoothing,
    )

    def make_dataset(features_of_split, split, is_training):
        return pipeline.make_feature_dataset(
            features_of_split,
            split.labels,
            batch_size=config.batch_size,
            is_training=is_training,
            seed=config.seed,
            options=options,
        )

    return (
        head_model,
        make_dataset(features.train, train_split, is_training=True),
        make_dataset(features.validation, validation_split, is_training=False),
    )


def _feature_fingerprint(config: TrainConfig, setup, train_split, validation_split) -> dict:
    """What the cached features depend on: a stored cache of another one is stale."""
    return {
        # Flags a resumed run may change do not change the features.
        "config": {
            name: value
            for name, value in config.to_flat().items()
            if name not in config_lib.RESUMABLE_CHANGES
        },
        "precision": setup.precision,
        "xla": setup.xla,
        "train_examples": len(train_split),
        "validation_examples": len(validation_split),
    }
