"""The two-phase transfer-learning trainer.

Phase 1 trains the head on a frozen base; phase 2 unfreezes the top blocks
(`effpipe.training.phases`). The best weights by validation accuracy over both
phases are evaluated once on the test split.

Outputs under the run directory (`workdir`):
  history.json              per phase, per epoch: metrics, seconds, images/s
  metrics.json              test top1/top5/loss, throughput, the resolved setup
  history.png               loss and accuracy over both phases
  checkpoints/best.weights.h5  the best weights by validation accuracy
  cache/phase1_features.npz    phase 1's pooled features (effpipe.training.feature_cache)

Under a distribution strategy (effpipe.training.distribution) every worker trains;
only the chief writes these. The others write theirs to a temporary directory,
deleted at the end, and read the run's resume state from `workdir` like the chief.
"""

import contextlib
import functools
import os
import statistics
import tempfile
import time
import warnings

import keras
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config

from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.model import batch_norm, efficientnet, factory, freezing
from effpipe.outputs import evaluation, export
from effpipe.training import (
    callbacks,
    failures,
    feature_cache,
    inputs,
    phases,
    run_state,
    runtime,
)
from effpipe.training import distribution as distribution_lib

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
    started = time.perf_counter()
    # --- Distribution: first, as a multi-worker strategy must configure collective
    # ops before TensorFlow initialises its devices. ---
    distribution = distribution_lib.resolve(config.distribution.strategy, config.batch_size)
    with contextlib.ExitStack() as stack:
        output_dir = _make_output_dir(stack, workdir, distribution)
        for reason in distribution.reasons:
            logging.info("%s", reason)

        # --- Runtime: device, precision, XLA, seeds. ---
        setup = _resolve_runtime(config, distribution, stack)

        # --- Data: source arrays, validation split, tf.data pipelines. ---
        data = inputs.prepare_data(config, distribution, workdir)

        # --- Model, under the resolved precision policy. ---
        stack.callback(
            keras.mixed_precision.set_global_policy, keras.mixed_precision.global_policy()
        )
        keras.mixed_precision.set_global_policy(setup.precision)
        # From here to the end of the evaluation, SIGINT and SIGTERM stop cleanly at the
        # next step or phase boundary; the handlers are restored however this ends.
        stop_on_signal = stack.enter_context(callbacks.StopOnSignal(workdir))
        # Variables made from here to the end of training are the strategy's (mirrored
        # on its replicas); the default strategy's scope changes nothing. The scope
        # closes when training ends, or with the run's stack on an error.
        training_scope = stack.enter_context(contextlib.ExitStack())
        training_scope.enter_context(distribution.strategy.scope())
        with failures.device_errors_as_usage_errors(
            config, setup, lambda: "Nothing was trained yet."
        ):
            model, calibration_callbacks = _make_model(config, distribution, data)
        use_feature_cache = _resolve_feature_cache(config, distribution)

        # --- Run state: what an earlier start of this run finished, if any. ---
        context = phases.PhaseContext(
            config=config,
            setup=setup,
            distribution=distribution,
            workdir=workdir,
            output_dir=output_dir,
            data=data,
            use_feature_cache=use_feature_cache,
            meter=callbacks.ThroughputMeter(config.batch_size),
            stop_on_signal=stop_on_signal,
            calibration_callbacks=calibration_callbacks,
        )
        state = _load_run_state(workdir, context.checkpoint_path, distribution)

        # --- Phases 1 and 2, resumed from the last completed epoch if any. ---
        steps_per_execution = {}
        startup_seconds = time.perf_counter() - started
        for phase in phases.make_phase_plan(config):
            resolved = phases.run_phase(phase, model, state, context)
            if resolved is not None:
                steps_per_execution[f"phase{phase.number}"] = resolved
        phases.write_history(output_dir, state.history)
        # What ran, not what was asked: Keras wraps the optimizer under mixed_float16.
        loss_scaling = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        training_scope.close()
        if not distribution.is_chief:
            logging.info("training done; the chief evaluates and writes the outputs")
            return {}
        if distribution.is_distributed:
            model = _copy_outside_strategy(model, config, data.source)

        # --- Final evaluation of the best weights, the only use of the test split. ---
        _load_best_weights(model, context.checkpoint_path, state)
        kept = functools.partial(phases.kept_weights_message, context.checkpoint_path, state)
        with failures.device_errors_as_usage_errors(config, setup, kept):
            stop_on_signal.check()
            evaluated = _evaluate_and_write_outputs(model, context)

    # --- Metrics: metrics.json and one line for the log. ---
    metrics = _make_metrics(
        context,
        evaluated,
        state,
        loss_scaling=loss_scaling,
        steps_per_execution=steps_per_execution,
        startup_seconds=startup_seconds,
    )
    run_dir.write_json(os.path.join(workdir, "metrics.json"), metrics)
    logging.info(
        "%s top-1 %.4f, top-5 %.4f, loss %.4f (best validation accuracy %s at epoch %s)",
        *(data.evaluated_on, metrics["top1"], metrics["top5"], metrics["loss"]),
        *(state.best_val_accuracy, metrics["best_epoch"]),
    )
    return metrics


def _evaluate_and_write_outputs(model: keras.Model, context: phases.PhaseContext) -> dict:
    """The final evaluation on the evaluated split, then what people look at and use:
    the plots and the export. Returns the evaluation's summary."""
    config, workdir = context.config, context.workdir
    source, test_split = context.data.source, context.data.test_split
    # One pass gives the loss, top-1, top-5 and per-class figures.
    probabilities = evaluation.predict_probabilities(
        model,
        test_split,
        config.batch_size,
        callbacks=[context.stop_on_signal, callbacks.KillPoints(is_evaluation=True)],
    )
    evaluated = evaluation.summarize(probabilities, test_split.labels, source.class_names)
    evaluation.write_plots(
        workdir, test_split, probabilities, evaluated, source.class_names, config.seed
    )
    evaluation.write_augmentations(
        model,
        context.data.train_split.load_images(1)[0],
        os.path.join(workdir, evaluation.AUGMENTATIONS_PNG),
    )
    if config.outputs.export:
        export_dir = os.path.join(workdir, export.EXPORT_DIR)
        export.export_model(model, source.class_names, export_dir, crop=config.data.source_crop)
        logging.info("exported the model to %s", export_dir)
    return evaluated


def _make_output_dir(
    stack: contextlib.ExitStack, workdir: str, distribution: distribution_lib.Distribution
) -> str:
    """The folder this process writes to: `workdir` on the chief, created when
    missing; a temporary folder, deleted when `stack` closes, on the other workers."""
    if distribution.is_chief:
        run_dir.create(workdir)
        return workdir
    # Every worker saves the same checkpoints and state (reading some variables for
    # a save is a collective), but only the chief's files are the run's.
    return stack.enter_context(
        tempfile.TemporaryDirectory(
            prefix=f"effpipe-worker{distribution.worker_index}-", ignore_cleanup_errors=True
        )
    )


def _resolve_runtime(
    config: TrainConfig, distribution: distribution_lib.Distribution, stack: contextlib.ExitStack
) -> runtime.Runtime:
    """Resolves device, precision and XLA, logs why, and seeds every generator; the
    process-wide switches it turns on are turned off when `stack` closes (op
    determinism left on makes Keras compile a later model in this process without
    XLA)."""
    setup = runtime.resolve(
        config.runtime, local_replicas=distribution.num_replicas // distribution.num_workers
    )
    logging.info("device: %s", setup.device)
    for warning in setup.warnings:
        logging.warning("%s", warning)
    for reason in (*setup.reasons, *setup.hints):
        logging.info("%s", reason)
    keras.utils.set_random_seed(config.seed)
    # TensorFlow's getter and reset are private (Keras reads the same getter), under
    # setup.cfg's tensorflow<2.22; test_train.py fails if they move.
    if config.runtime.deterministic and not tf_config.is_op_determinism_enabled():
        tf.config.experimental.enable_op_determinism()
        stack.callback(tf_config.disable_op_determinism)
    if config.runtime.debug_numerics:
        # Raises at the first op whose output holds a NaN or infinity, naming it.
        tf.debugging.enable_check_numerics()
        stack.callback(tf.debugging.disable_check_numerics)
        logging.info("--debug_numerics: TensorFlow's numeric checks are on (slow)")
    return setup


def _make_model(config, distribution, data: inputs.RunData) -> tuple[keras.Model, tuple]:
    """The full model in the current scope, and the calibration callbacks of a base
    trained from scratch (none for a pretrained one)."""
    model = _configured_model(
        config, data.source, synchronized_batch_norm=distribution.num_replicas > 1
    )
    if distribution.is_distributed:
        distribution_lib.use_strategy_of_scope(model)
    freezing.check_unfreeze_blocks(model, config.phases.unfreeze_blocks)
    logging.info(
        "model %s at %d px, head %s, %d parameters; augmentation %s",
        *(config.model.variant, config.model.resolved_image_size, config.model.head),
        *(model.count_params(), factory.describe_augmentation(config.augmentation)),
    )
    if config.model.weights != "none":
        return model, ()
    # A base trained from scratch gets BatchNormalization statistics computed
    # from training images, now and before every validation (effpipe.model.batch_norm says
    # why).
    calibration_images = data.train_split.load_images(CALIBRATION_EXAMPLES)
    batch_norm.calibrate_batch_norm(model, calibration_images, config.batch_size)
    logging.info(
        "random base: BatchNormalization statistics calibrated on %d training "
        "images, again before each validation",
        len(calibration_images),
    )
    return model, (batch_norm.BatchNormCalibration(calibration_images, config.batch_size),)


def _resolve_feature_cache(
    config: TrainConfig, distribution: distribution_lib.Distribution
) -> bool:
    """Whether phase 1 trains on cached features, with the reason logged."""
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
    return use_feature_cache


def _load_run_state(
    workdir: str, checkpoint_path: str, distribution: distribution_lib.Distribution
) -> run_state.RunState:
    """The state an earlier start of the run saved in `workdir`, or a fresh one.

    Raises:
      UsageError: the workers would resume from different states.
    """
    state = run_state.load_state(workdir) or run_state.RunState.fresh()
    # A kill between state.json and publishing left the checkpoint behind.
    if distribution.is_chief:
        run_state.publish_best(workdir, state, checkpoint_path)
    # Workers that resumed from different states would deadlock: check first.
    distribution_lib.check_same_on_every_worker(
        distribution,
        [state.phase, state.epochs_done],
        "the resume point (phase, epochs done)",
    )
    return state


def _load_best_weights(model: keras.Model, checkpoint_path: str, state) -> None:
    """Loads the run's best weights into `model`, if this run wrote any."""
    # Only a checkpoint this run wrote counts: one left by an earlier run in the
    # same directory could belong to other flags.
    if not state.checkpoint_written:
        return
    with warnings.catch_warnings():
        # The checkpoint may come from phase 1, whose optimizer had fewer
        # variables; only the model weights matter for evaluation.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(checkpoint_path)


def _make_metrics(
    context: phases.PhaseContext,
    evaluated: dict,
    state: run_state.RunState,
    *,
    loss_scaling: bool,
    steps_per_execution: dict,
    startup_seconds: float,
) -> dict:
    """The contents of metrics.json: the test figures and the resolved setup."""
    config, setup, distribution = context.config, context.setup, context.distribution
    source, use_feature_cache = context.data.source, context.use_feature_cache
    history = state.history
    all_epochs = history["phase1"] + history["phase2"]
    # Epochs on cached features train the head alone: their images/s is not a
    # training step's.
    full_model_epochs = history["phase2"] + ([] if use_feature_cache else history["phase1"])
    return {
        "top1": evaluated["top1"],
        "top5": evaluated["top5"],
        "loss": evaluated["loss"],
        "evaluated_on": context.data.evaluated_on,
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": (
            max(all_epochs, key=lambda e: e["val_accuracy"])["epoch"] if all_epochs else None
        ),
        "train_images_per_sec": (
            statistics.median(e["images_per_sec"] for e in full_model_epochs or all_epochs)
            if all_epochs
            else None
        ),
        "phase1_feature_cache": use_feature_cache,
        # What a user waits for: from the trainer's start to the first phase (data,
        # model, weights), then from each phase's start to its first step's end.
        "startup_seconds": round(startup_seconds, 1),
        "first_step_seconds": context.meter.first_step_seconds,
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
        # Files left out with --on_bad_image=skip: how many, and the first few.
        "skipped_images": len(source.skipped),
        "skipped_image_paths": list(source.skipped[:10]),
    }


def _configured_model(config: TrainConfig, source, **options) -> keras.Model:
    """`factory.make_configured_model` from the run's slices for `source`'s images."""
    return factory.make_configured_model(
        config.model,
        config.augmentation,
        source.source_image_size,
        source.num_classes,
        seed=config.seed,
        compile_augmentation=not config.runtime.debug_numerics,
        **options,
    )


def _copy_outside_strategy(model: keras.Model, config: TrainConfig, source) -> keras.Model:
    """The trained model rebuilt outside the strategy, for the chief's evaluation and
    export: a prediction pass alone on the chief, and a SavedModel of plain variables
    that serves on one device."""
    copy = _configured_model(config, source, random_weights=True)
    efficientnet.copy_weights(model, copy)
    return copy
