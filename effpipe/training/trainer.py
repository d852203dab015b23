"""The two-phase transfer-learning trainer.

Phase 1 trains the head on a frozen base; phase 2 unfreezes the top blocks of the
base (BatchNormalization stays frozen), recompiles with a lower learning rate and
trains on. The best weights by validation accuracy over both phases are kept and
evaluated once on the test split.

Outputs under the run directory (`workdir`):
  history.json              per phase, per epoch: metrics, seconds, images/s
  metrics.json              test top1/top5/loss, throughput, the resolved setup
  history.png               loss and accuracy over both phases
  checkpoints/best.weights.h5  the best weights by validation accuracy
  cache/phase1_features.npz    the pooled features phase 1 trains on, when the
                               feature cache is on (effpipe.training.feature_cache)

Under a distribution strategy (effpipe.training.distribution) every worker trains; only the
chief writes these. The others write theirs to a temporary directory, deleted at
the end, and read the run's resume state from `workdir` like the chief.
"""

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import warnings
import zlib

import keras
import tensorflow as tf
from absl import logging

from effpipe import config as config_lib
from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.data import pipeline, sources, splits
from effpipe.errors import UsageError, is_out_of_memory
from effpipe.model import batch_norm, efficientnet, factory, freezing
from effpipe.outputs import evaluation, export, plots
from effpipe.training import callbacks, checkpoints, feature_cache, run_state, runtime, summaries
from effpipe.training import distribution as distribution_lib

BEST_CHECKPOINT = os.path.join("checkpoints", "best.weights.h5")
# Images used to calibrate the BatchNormalization statistics of a random base.
CALIBRATION_EXAMPLES = 256


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict:
    """Runs both phases and the final evaluation, writing every output to `workdir`.

    Args:
      config: the validated run configuration.
      workdir: the run directory; created when missing.

    Returns:
      The metrics written to metrics.json (on a worker other than the chief, which
      writes none: {}).

    Raises:
      UsageError: bad input discovered while loading data or weights.
    """
    # First: a multi-worker strategy must configure collective ops before TensorFlow
    # initialises its devices.
    distribution = distribution_lib.resolve(config.distribution.strategy, config.batch_size)
    if distribution.is_chief:
        run_dir.create(workdir)
        return _train_and_evaluate(config, workdir, workdir, distribution)
    # Every worker saves the same checkpoints and state (reading some variables for
    # a save is a collective), but only the chief's files are the run's.
    output_dir = tempfile.mkdtemp(prefix=f"effpipe-worker{distribution.worker_index}-")
    try:
        return _train_and_evaluate(config, workdir, output_dir, distribution)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def _train_and_evaluate(
    config: TrainConfig, workdir: str, output_dir: str, distribution: distribution_lib.Distribution
) -> dict:
    """`train_and_evaluate`, writing to `output_dir` and resuming from `workdir`."""
    strategy = distribution.strategy
    for reason in distribution.reasons:
        logging.info("%s", reason)

    # --- Runtime: device, precision, XLA, seeds. ---
    setup = runtime.resolve_runtime(
        mixed_precision=config.runtime.mixed_precision,
        mixed_precision_dtype=config.runtime.mixed_precision_dtype,
        xla=config.runtime.xla,
        local_replicas=distribution.num_replicas // distribution.num_workers,
    )
    if config.runtime.debug_numerics and setup.xla:
        setup = dataclasses.replace(
            setup,
            xla=False,
            reasons=(*setup.reasons, "XLA off: --debug_numerics instruments ops XLA cannot run"),
        )
    logging.info("device: %s", setup.device)
    for warning in setup.warnings:
        logging.warning("%s", warning)
    for reason in setup.reasons:
        logging.info("%s", reason)
    keras.utils.set_random_seed(config.seed)
    if config.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.runtime.debug_numerics:
        # Raises at the first op whose output holds a NaN or infinity, naming it.
        tf.debugging.enable_check_numerics()
        logging.info("--debug_numerics: TensorFlow's numeric checks are on (slow)")

    # --- Data: source arrays, validation split, tf.data pipelines. ---
    source = sources.load_configured_source(config)
    train_split, validation_split, test_split, evaluated_on = splits.configured_splits(
        config, source
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
    pipeline_options = pipeline.pipeline_options_of(config)

    def make_dataset(split, is_training):
        return pipeline.make_dataset(
            split.images,
            split.labels,
            batch_size=config.batch_size,
            is_training=is_training,
            seed=config.seed,
            options=pipeline_options,
        )

    # Training streams are endless (input_pipeline says why); an epoch is this many
    # steps. Each fit gets a fresh stream from the seed, so epoch k's batches do not
    # depend on what ran before in this process (a resumed run sees the same ones).
    # Each of several workers trains on its equal shard, batch_size / workers images
    # of it per step.
    workers = distribution.num_workers
    steps_per_epoch = (len(train_split) // workers) // (config.batch_size // workers)
    validation_dataset = make_dataset(validation_split, is_training=False)
    if distribution.is_distributed:
        # Keras splits each validation batch over the replicas; several workers take
        # every other batch (DATA: the arrays have no files to shard by).
        validation_options = tf.data.Options()
        validation_options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        validation_dataset = validation_dataset.with_options(validation_options)

    def make_training_stream(phase: int, initial_epoch: int):
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
                train_split.images,
                train_split.labels,
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
            local_replicas = distribution.num_replicas // workers
            return dataset.skip(initial_epoch * steps_per_epoch * local_replicas)

        return distribution_lib.distribute_training_stream(distribution, config.batch_size, stream)

    # --- Model, under the resolved precision policy. ---
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(setup.precision)
    # From here to the end of the evaluation, SIGINT and SIGTERM stop cleanly at the
    # next step or phase boundary; the handlers are restored however this ends.
    stop_on_signal = callbacks.StopOnSignal(workdir).__enter__()
    # Variables made from here to the end of training are the strategy's (mirrored
    # on its replicas); the default strategy's scope changes nothing.
    strategy_scope = strategy.scope()
    strategy_scope.__enter__()
    try:
        with _device_errors_as_usage_errors(config, setup, lambda: "Nothing was trained yet."):
            model = factory.make_configured_model(
                config,
                source.source_image_size,
                source.num_classes,
                synchronized_batch_norm=distribution.num_replicas > 1,
            )
            if distribution.is_distributed:
                distribution_lib.use_strategy_of_scope(model)
            freezing.check_unfreeze_blocks(model, config.phases.unfreeze_blocks)
            # A base trained from scratch gets BatchNormalization statistics computed
            # from training images, now and before every validation (models.py says
            # why).
            calibration_callbacks = []
            if config.model.weights == "none":
                calibration_images = train_split.images[:CALIBRATION_EXAMPLES]
                batch_norm.calibrate_batch_norm(model, calibration_images, config.batch_size)
                calibration_callbacks.append(
                    batch_norm.BatchNormCalibration(calibration_images, config.batch_size)
                )
                logging.info(
                    "random base: BatchNormalization statistics calibrated on %d training "
                    "images, again before each validation",
                    len(calibration_images),
                )
        logging.info(
            "model %s at %d px, head %s, %d parameters; augmentation %s",
            config.model.variant,
            config.model.resolved_image_size,
            config.model.head,
            model.count_params(),
            factory.describe_augmentation(config),
        )
        use_feature_cache, reason = feature_cache.resolve(
            config, distributed=distribution.is_distributed
        )
        logging.info("%s", reason)
        if use_feature_cache and config.model.weights == "none":
            logging.info(
                "random base: the cached features are its inference output (stochastic "
                "depth off, as validation sees them); without the cache phase 1 would "
                "train the head on features with stochastic depth on"
            )

        # --- Phases 1 and 2, resumed from the last completed epoch if any. ---
        checkpoint_path = os.path.join(output_dir, BEST_CHECKPOINT)
        meter = callbacks.ThroughputMeter(config.batch_size)
        state = run_state.load_state(workdir)
        if state is None:
            history = {"phase1": [], "phase2": []}
            best_validation_accuracy, checkpoint_written, epochs_done = None, False, 0
            best_staged = None
        else:
            history = state.history
            best_validation_accuracy = state.best_val_accuracy
            checkpoint_written, epochs_done = state.checkpoint_written, state.epochs_done
            best_staged = state.best_weights_file
            # A kill between state.json and publishing left the checkpoint behind.
            if distribution.is_chief:
                run_state.publish_best(workdir, state, checkpoint_path)
        # Workers that resumed from different states would deadlock: check first.
        distribution_lib.check_same_on_every_worker(
            distribution,
            [state.phase if state else 0, state.epochs_done if state else 0],
            "the resume point (phase, epochs done)",
        )
        steps_per_execution = {}
        phases = [
            (1, 0, config.phases.phase1_epochs, config.learning_rate(1)),
            (2, config.phases.phase1_epochs, config.phases.phase2_epochs, config.learning_rate(2)),
        ]
        for phase, first_epoch, epochs, learning_rate in phases:
            stop_on_signal.check()
            if state is not None and state.phase > phase:
                continue  # Finished before the interruption.
            unfrozen = freezing.set_phase(model, config, phase)
            if phase == 2:
                logging.info(
                    "phase 2 unfreezes blocks %s and the top conv; BatchNormalization %s",
                    ", ".join(unfrozen),
                    "trains (--weights=none)" if config.model.weights == "none" else "stays frozen",
                )
            if epochs == 0:
                logging.info("phase %d: 0 epochs, skipped", phase)
                continue
            head_only = phase == 1 and use_feature_cache
            steps_per_execution[f"phase{phase}"], reason = runtime.resolve_steps_per_execution(
                config, steps_per_epoch, accelerator=setup.accelerator, head_only=head_only
            )
            logging.info("phase %d: %s", phase, reason)
            factory.compile_model(
                model,
                learning_rate,
                jit_compile=setup.xla,
                steps_per_execution=1 if head_only else steps_per_execution[f"phase{phase}"],
            )
            if distribution.is_distributed:
                # Its slots are mirrored variables: made here, in the scope, not
                # lazily inside the first replicated step.
                model.optimizer.build(model.trainable_variables)
            if state is not None and state.phase == phase:
                run_state.restore(model, workdir, state)
                # The saved optimizer holds the learning rate it ran with; a resumed
                # run may lower it (after a NaN loss, say: run_dir allows that).
                model.optimizer.learning_rate.assign(learning_rate)
            initial_epoch = max(first_epoch, epochs_done)
            if initial_epoch >= first_epoch + epochs:
                logging.info("phase %d: already done (%d epochs)", phase, epochs)
                continue
            logging.info(
                "phase %d: epochs %d..%d at learning rate %g, %d trainable parameters",
                phase,
                initial_epoch + 1,
                first_epoch + epochs,
                learning_rate,
                _count_trainable(model),
            )
            # The images, or on the feature cache their features in the same order.
            fit_model, train_dataset, phase_validation_dataset = (
                model,
                make_training_stream(phase, initial_epoch),
                validation_dataset,
            )
            phase_callbacks = calibration_callbacks
            if phase == 1 and use_feature_cache:
                kept_before = functools.partial(
                    _kept_weights, checkpoint_path, checkpoint_written, best_validation_accuracy
                )
                with _device_errors_as_usage_errors(config, setup, kept_before):
                    fit_model, train_dataset, phase_validation_dataset = _cached_phase1_inputs(
                        config, setup, model, output_dir, train_split, validation_split,
                        stop_on_signal, steps_per_execution["phase1"],
                    )  # fmt: skip
                train_dataset = train_dataset.skip(initial_epoch * steps_per_epoch)
                # The features were computed with the base's BatchNormalization
                # statistics of the one calibration above; the base is frozen, so a
                # recalibration on the same images would change them only by its
                # stochastic-depth draws, and would make the stored features stale.
                phase_callbacks = []
            # The checkpoint and the state hold the full model, whichever model fits.
            checkpoint = checkpoints.BestCheckpoint(
                checkpoint_path,
                monitor="val_accuracy",
                best=best_validation_accuracy,
                model_to_save=model,
                staging_dir=os.path.join(output_dir, run_state.STATE_DIR),
                staged_file=best_staged,
            )
            saver = run_state.EpochStateSaver(
                output_dir,
                phase,
                history,
                meter,
                checkpoint,
                checkpoint_written,
                model_to_save=model,
            )
            kept_so_far = functools.partial(
                _kept_weights_by, checkpoint, checkpoint_path, already_written=checkpoint_written
            )
            with _device_errors_as_usage_errors(config, setup, kept_so_far):
                fit_model.fit(
                    train_dataset,
                    steps_per_epoch=steps_per_epoch,
                    validation_data=phase_validation_dataset,
                    initial_epoch=initial_epoch,
                    epochs=first_epoch + epochs,
                    # The meter first: calibration work before validation is not
                    # training. The checkpoint before the saver, which records its
                    # best. TerminateOnNaN stops at the first non-finite loss.
                    callbacks=[
                        meter,
                        *summaries.make_callbacks(
                            output_dir,
                            phase,
                            meter,
                            model,
                            train_split.images[: summaries.AUGMENTED_IMAGES],
                            config.outputs.profile_step_range,
                        ),
                        *phase_callbacks,
                        checkpoint,
                        saver,
                        keras.callbacks.TerminateOnNaN(),
                        stop_on_signal,
                    ],
                    verbose=_keras_verbosity(),
                    shuffle=False,
                )
            best_validation_accuracy = checkpoint.best
            checkpoint_written = checkpoint_written or checkpoint.saved
            best_staged = checkpoint.staged_file
            last_loss = history[f"phase{phase}"][-1]["loss"]
            if not math.isfinite(last_loss):
                _write_history(output_dir, history)
                raise UsageError(
                    f"phase {phase}: the training loss became {last_loss} in epoch "
                    f"{history[f'phase{phase}'][-1]['epoch']}; training stopped: lower "
                    f"--phase{phase}_learning_rate (now "
                    f"{getattr(config.phases, f'phase{phase}_learning_rate'):g}) and rerun: the run "
                    "resumes from its last good epoch. "
                    + _kept_weights(checkpoint_path, checkpoint_written, best_validation_accuracy)
                )
        _write_history(output_dir, history)
        # What ran, not what was asked: Keras wraps the optimizer under mixed_float16.
        loss_scaling = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        strategy_scope.__exit__(None, None, None)
        strategy_scope = None
        if not distribution.is_chief:
            logging.info("training done; the chief evaluates and writes the outputs")
            return {}
        if distribution.is_distributed:
            model = _copy_outside_strategy(model, config, source)

        # --- Final evaluation of the best weights, the only use of the test split. ---
        # Only a checkpoint this run wrote counts: one left by an earlier run in the
        # same directory could belong to other flags.
        if checkpoint_written:
            with warnings.catch_warnings():
                # The checkpoint may come from phase 1, whose optimizer had fewer
                # variables; only the model weights matter for evaluation.
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(checkpoint_path)
        kept = _kept_weights(checkpoint_path, checkpoint_written, best_validation_accuracy)
        with _device_errors_as_usage_errors(config, setup, lambda: kept):
            stop_on_signal.check()
            # One pass gives the loss, top-1, top-5 and per-class figures.
            probabilities = evaluation.predict_probabilities(
                model, test_split, config.batch_size, callbacks=[stop_on_signal]
            )
            evaluated = evaluation.summarize(probabilities, test_split.labels, source.class_names)
            # --- What people look at and use: plots and the export. ---
            evaluation.write_plots(
                workdir, test_split, probabilities, evaluated, source.class_names, config.seed
            )
            evaluation.write_augmentations(
                model, train_split.images[0], os.path.join(workdir, evaluation.AUGMENTATIONS_PNG)
            )
            if config.outputs.export:
                export_dir = os.path.join(workdir, export.EXPORT_DIR)
                export.export_model(model, source.class_names, export_dir)
                logging.info("exported the model to %s", export_dir)
    finally:
        if strategy_scope is not None:
            strategy_scope.__exit__(None, None, None)
        stop_on_signal.__exit__(None, None, None)
        keras.mixed_precision.set_global_policy(previous_policy)

    all_epochs = history["phase1"] + history["phase2"]
    # Epochs on cached features train the head alone: their images/s is not a
    # training step's.
    full_model_epochs = history["phase2"] + ([] if use_feature_cache else history["phase1"])
    metrics = {
        "top1": evaluated["top1"],
        "top5": evaluated["top5"],
        "loss": evaluated["loss"],
        "evaluated_on": evaluated_on,
        "best_val_accuracy": best_validation_accuracy,
        "best_epoch": _best_epoch(all_epochs),
        "train_images_per_sec": (
            statistics.median(e["images_per_sec"] for e in full_model_epochs or all_epochs)
            if all_epochs
            else None
        ),
        "phase1_feature_cache": use_feature_cache,
        "per_class_accuracy": evaluated["per_class_accuracy"],
        "worst_classes": evaluated["worst_classes"],
        "variant": config.model.variant,
        "image_size": config.model.resolved_image_size,
        "batch_size": config.batch_size,
        "precision": setup.precision,
        "loss_scaling": loss_scaling,
        "xla": setup.xla,
        "steps_per_execution": steps_per_execution,
        "augment": config.augmentation.augment,
        "device": setup.device,
        "strategy": distribution.kind,
        "replicas": distribution.num_replicas,
        "workers": distribution.num_workers,
        "dataset": source.name,
        "num_classes": source.num_classes,
    }
    run_dir.write_json(os.path.join(workdir, "metrics.json"), metrics)
    logging.info(
        "%s top-1 %.4f, top-5 %.4f, loss %.4f (best validation accuracy %s at epoch %s)",
        evaluated_on,
        metrics["top1"],
        metrics["top5"],
        metrics["loss"],
        best_validation_accuracy,
        metrics["best_epoch"],
    )
    return metrics


def _cached_phase1_inputs(
    config: TrainConfig,
    setup,
    model,
    workdir,
    train_split,
    validation_split,
    stop_on_signal,
    steps_per_execution: int,
):
    """Phase 1 on cached features: the head model, compiled, and its two datasets.

    The features come from the file a previous start of this run saved, or are
    computed now (progress shown) and saved. The head model shares the full model's
    head layers and optimizer (the model must be compiled, and restored on resume),
    so fitting it trains the full model's head; its training stream is the images'
    stream over the features, in the same order (`pipeline.make_feature_dataset`).

    Returns:
      (head model, endless training dataset, validation dataset).
    """
    feature_model = feature_cache.make_feature_model(model)
    # Compiled for the run's XLA setting, as the phase-1 step computes the features.
    feature_model.compile(jit_compile=setup.xla)
    options = pipeline.pipeline_options_of(config)

    def compute(split):
        images = pipeline.make_dataset(
            split.images,
            split.labels,
            batch_size=config.batch_size,
            is_training=False,
            options=options,
        )
        return feature_model.predict(images, verbose=_keras_verbosity(), callbacks=[stop_on_signal])

    fingerprint = {
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
    path = os.path.join(workdir, feature_cache.CACHE_FILE)
    features = feature_cache.load_or_compute(
        path,
        fingerprint,
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


def _copy_outside_strategy(model: keras.Model, config: TrainConfig, source) -> keras.Model:
    """The trained model rebuilt outside the strategy, for the chief's evaluation and
    export: a prediction pass alone on the chief, and a SavedModel of plain variables
    that serves on one device."""
    copy = factory.make_configured_model(
        config, source.source_image_size, source.num_classes, random_weights=True
    )
    efficientnet.copy_weights(model, copy)
    return copy


def _write_history(workdir: str, history: dict) -> None:
    run_dir.write_json(os.path.join(workdir, "history.json"), history)
    plots.plot_history(history, os.path.join(workdir, "history.png"))


def _kept_weights_by(checkpoint, checkpoint_path: str, *, already_written: bool) -> str:
    """`_kept_weights` as a BestCheckpoint stands now, for an error mid-fit."""
    return _kept_weights(checkpoint_path, already_written or checkpoint.saved, checkpoint.best)


def _kept_weights(checkpoint_path: str, written: bool, best: float | None) -> str:
    if not written:
        return "No checkpoint was written (no finite epoch improved validation accuracy)."
    return (
        f"The best weights so far (validation accuracy {best:.4f}) are kept in {checkpoint_path}."
    )


@contextlib.contextmanager
def _device_errors_as_usage_errors(config: TrainConfig, setup, describe_kept_weights):
    """Turns running out of device memory, and a --debug_numerics finding, into one
    line with the fix.

    `describe_kept_weights()` says, at the time of the error, what checkpoint is kept.
    """
    try:
        yield
    except (tf.errors.OpError, MemoryError) as error:
        if not is_out_of_memory(error):
            _raise_numerics_finding(config, error, describe_kept_weights)
            raise
        raise UsageError(
            f"out of memory on {setup.device} at --batch_size={config.batch_size} "
            f"({config.model.variant} at {config.model.resolved_image_size} px, {setup.precision}): "
            f"find the largest batch that fits with `{runtime.tuner_command(config)}` (your card's "
            "memory in GB), or lower --batch_size. " + describe_kept_weights()
        ) from error


def _raise_numerics_finding(config: TrainConfig, error, describe_kept_weights) -> None:
    """Raises a --debug_numerics finding as one UsageError line; returns otherwise."""
    if not (
        config.runtime.debug_numerics
        and isinstance(error, tf.errors.InvalidArgumentError)
        and "Infinity or NaN" in str(error)
    ):
        return
    # The message names the checking node ("Detected at node X/CheckNumericsV2")
    # before a long stack; the op is X.
    node = re.search(r"Detected at node (\S+)", str(error))
    where = node.group(1).removesuffix("/CheckNumericsV2") if node else "an op"
    raise UsageError(
        f"--debug_numerics: the first NaN or infinity came out of {where}: lower the "
        "learning rate of that phase. " + describe_kept_weights()
    ) from error


def _keras_verbosity() -> int:
    """A live progress bar on a terminal; one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _count_trainable(model: keras.Model) -> int:
    return int(sum(math.prod(weight.shape) for weight in model.trainable_weights))


def _best_epoch(epochs: list[dict]) -> int | None:
    if not epochs:
        return None
    return max(epochs, key=lambda e: e["val_accuracy"])["epoch"]
