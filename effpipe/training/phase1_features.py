"""Phase 1 on cached features: the head model fits on the base's pooled features.

The features come from the file a previous start of the run saved, or are computed
once (progress shown) and saved (`feature_cache`); the head model's training stream
is the images' stream over the features, in the same order
(`pipeline.make_feature_dataset`).
"""

import functools
import os

from effpipe import config as config_lib
from effpipe.config import TrainConfig
from effpipe.data import pipeline
from effpipe.model import factory
from effpipe.training import callbacks, feature_cache


def cached_phase1_inputs(
    config: TrainConfig,
    setup,
    model,
    output_dir: str,
    train_split,
    validation_split,
    stop_on_signal: callbacks.StopOnSignal,
    steps_per_execution: int,
    initial_epoch: int,
):
    """Phase 1 on cached features: the head model, compiled, and its two datasets.

    The features are this run's stored ones (`_stored_features`). The head model
    shares the full model's head layers and optimizer (the model must be compiled,
    and restored on resume), so fitting it trains the full model's head; its
    training stream is the images' stream over the features, in the same order
    (`pipeline.make_feature_dataset`), from `initial_epoch` on.

    Args:
      config: the run configuration.
      setup: the resolved runtime (precision and XLA).
      model: the full model, compiled for phase 1 (and restored on resume).
      output_dir: where this process keeps the cache file.
      train_split: the training examples.
      validation_split: the validation examples.
      stop_on_signal: the run's StopOnSignal, a callback of the feature passes.
      steps_per_execution: phase 1's steps per compiled call.
      initial_epoch: the epoch the training stream starts at (counted from 0).

    Returns:
      (head model, endless training dataset, validation dataset).
    """
    features = _stored_features(
        config, setup, model, output_dir, (train_split, validation_split), stop_on_signal
    )
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
            initial_epoch=initial_epoch,
            options=pipeline.pipeline_options_of(config.runtime),
        )

    return (
        head_model,
        make_dataset(features.train, train_split, is_training=True),
        make_dataset(features.validation, validation_split, is_training=False),
    )


def _stored_features(config, setup, model, output_dir, split_pair, stop_on_signal):
    """The pooled features of the (train, validation) splits: loaded from this run's
    cache file, or computed (progress shown) and saved there."""
    feature_model = feature_cache.make_feature_model(model)
    # Compiled for the run's XLA setting, as the phase-1 step computes the features.
    feature_model.compile(jit_compile=setup.xla)
    options = pipeline.pipeline_options_of(config.runtime)

    def compute(split):
        images = pipeline.make_dataset(
            split, batch_size=config.batch_size, is_training=False, options=options
        )
        return feature_model.predict(
            images, verbose=callbacks.keras_verbosity(), callbacks=[stop_on_signal]
        )

    path = os.path.join(output_dir, feature_cache.CACHE_FILE)
    features = feature_cache.load_or_compute(
        path,
        _feature_fingerprint(config, setup, *split_pair),
        *(functools.partial(compute, split) for split in split_pair),
    )
    feature_cache.log_features(features, path)
    return features


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
