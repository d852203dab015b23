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
"""

import math
import os
import statistics
import sys
import warnings

import keras
import tensorflow as tf
from absl import logging

from effpipe import (
    augment,
    data_sources,
    input_pipeline,
    models,
    plots,
    run_files,
    runtime,
    timing,
)
from effpipe.config import TrainConfig
from effpipe.errors import UsageError

BEST_CHECKPOINT = os.path.join("checkpoints", "best.weights.h5")
# Images used to calibrate the BatchNormalization statistics of a random base.
CALIBRATION_EXAMPLES = 256


def train_and_evaluate(config: TrainConfig, workdir: str) -> dict:
    """Runs both phases and the final evaluation, writing every output to `workdir`.

    Args:
      config: the validated run configuration.
      workdir: the run directory; created when missing.

    Returns:
      The metrics written to metrics.json.

    Raises:
      UsageError: bad input discovered while loading data or weights.
    """
    os.makedirs(workdir, exist_ok=True)

    # --- Runtime: device, precision, XLA, seeds. ---
    setup = runtime.resolve_runtime(mixed_precision=config.mixed_precision, xla=config.xla)
    logging.info("device: %s", setup.device)
    for reason in setup.reasons:
        logging.info("%s", reason)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    # --- Data: source arrays, validation split, tf.data pipelines. ---
    source = data_sources.load_configured_source(config)
    train_split, validation_split = data_sources.split_validation(
        source.train,
        config.validation_fraction,
        seed=config.seed,
        selection=config.validation_selection,
    )
    test_split, evaluated_on = source.test, "test"
    if test_split is None:
        logging.warning("%s has no test split: the final evaluation uses validation", source.name)
        test_split, evaluated_on = validation_split, "validation"
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
    pipeline_options = pipeline_options_of(config)

    def make_dataset(split, is_training):
        return input_pipeline.make_dataset(
            split.images,
            split.labels,
            batch_size=config.batch_size,
            is_training=is_training,
            seed=config.seed,
            options=pipeline_options,
        )

    train_dataset = make_dataset(train_split, is_training=True)
    validation_dataset = make_dataset(validation_split, is_training=False)

    # --- Model, under the resolved precision policy. ---
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(setup.precision)
    try:
        model = models.make_model(
            variant=config.variant,
            image_size=config.resolved_image_size,
            source_size=source.source_image_size,
            num_classes=source.num_classes,
            weights=config.weights,
            head=config.head,
            dropout=config.dropout,
            augment_config=augment_config(config),
            seed=config.seed,
        )
        models.check_unfreeze_blocks(model, config.unfreeze_blocks)
        # A base trained from scratch gets BatchNormalization statistics computed
        # from training images, now and before every validation (models.py says why).
        calibration_callbacks = []
        if config.weights == "none":
            calibration_images = train_split.images[:CALIBRATION_EXAMPLES]
            models.calibrate_batch_norm(model, calibration_images, config.batch_size)
            calibration_callbacks.append(
                models.BatchNormCalibration(calibration_images, config.batch_size)
            )
            logging.info(
                "random base: BatchNormalization statistics calibrated on %d training "
                "images, again before each validation",
                len(calibration_images),
            )
        logging.info(
            "model %s at %d px, head %s, %d parameters; augmentation %s",
            config.variant,
            config.resolved_image_size,
            config.head,
            model.count_params(),
            _describe_augmentation(config),
        )

        # --- Phases 1 and 2. ---
        checkpoint_path = os.path.join(workdir, BEST_CHECKPOINT)
        meter = timing.ThroughputMeter(config.batch_size)
        history = {"phase1": [], "phase2": []}
        phases = [
            (1, config.phase1_epochs, config.phase1_learning_rate),
            (2, config.phase2_epochs, config.phase2_learning_rate),
        ]
        best_validation_accuracy = None
        for phase, epochs, learning_rate in phases:
            if phase == 1:
                models.freeze_base(model)
            else:
                # A base trained from scratch has no pretrained statistics to keep.
                freeze_batch_norm = config.weights != "none"
                unfrozen = models.unfreeze_top_blocks(
                    model, config.unfreeze_blocks, freeze_batch_norm=freeze_batch_norm
                )
                logging.info(
                    "phase 2 unfreezes blocks %s and the top conv; BatchNormalization %s",
                    ", ".join(unfrozen),
                    "stays frozen" if freeze_batch_norm else "trains (--weights=none)",
                )
            if epochs == 0:
                logging.info("phase %d: 0 epochs, skipped", phase)
                continue
            compile_model(model, learning_rate, jit_compile=setup.xla)
            logging.info(
                "phase %d: %d epochs at learning rate %g, %d trainable parameters",
                phase,
                epochs,
                learning_rate,
                _count_trainable(model),
            )
            initial_epoch = len(history["phase1"])
            checkpoint = keras.callbacks.ModelCheckpoint(
                checkpoint_path,
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=best_validation_accuracy,
            )
            fit = model.fit(
                train_dataset,
                validation_data=validation_dataset,
                initial_epoch=initial_epoch,
                epochs=initial_epoch + epochs,
                # The meter first: calibration work before validation is not training.
                callbacks=[meter, *calibration_callbacks, checkpoint],
                verbose=_keras_verbosity(),
                # The dataset reshuffles itself every epoch.
                shuffle=False,
            )
            history[f"phase{phase}"] = _epoch_records(fit.history, meter.records[-epochs:])
            phase_best = max(fit.history["val_accuracy"])
            if best_validation_accuracy is None or phase_best > best_validation_accuracy:
                best_validation_accuracy = phase_best
        run_files.write_json(os.path.join(workdir, "history.json"), history)
        plots.plot_history(history, os.path.join(workdir, "history.png"))

        # --- Final evaluation of the best weights, the only use of the test split. ---
        # Only a checkpoint this run wrote counts: one left by an earlier run in the
        # same directory could belong to other flags.
        if best_validation_accuracy is not None:
            with warnings.catch_warnings():
                # The checkpoint may come from phase 1, whose optimizer had fewer
                # variables; only the model weights matter for evaluation.
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(checkpoint_path)
        if model.optimizer is None:
            compile_model(model, config.phase1_learning_rate, jit_compile=setup.xla)
        results = model.evaluate(
            make_dataset(test_split, is_training=False),
            return_dict=True,
            verbose=_keras_verbosity(),
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    all_epochs = history["phase1"] + history["phase2"]
    metrics = {
        "top1": float(results["accuracy"]),
        "top5": float(results["top5"]),
        "loss": float(results["loss"]),
        "evaluated_on": evaluated_on,
        "best_val_accuracy": best_validation_accuracy,
        "best_epoch": _best_epoch(all_epochs),
        "train_images_per_sec": (
            statistics.median(e["images_per_sec"] for e in all_epochs) if all_epochs else None
        ),
        "variant": config.variant,
        "image_size": config.resolved_image_size,
        "batch_size": config.batch_size,
        "precision": setup.precision,
        "xla": setup.xla,
        "augment": config.augment,
        "device": setup.device,
        "dataset": source.name,
        "num_classes": source.num_classes,
    }
    run_files.write_json(os.path.join(workdir, "metrics.json"), metrics)
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


def pipeline_options_of(config: TrainConfig) -> input_pipeline.PipelineOptions:
    """The input pipeline's knobs from the run's flags (trainer and benchmarks)."""
    return input_pipeline.PipelineOptions(
        deterministic=config.deterministic, autotune=config.autotune, threads=config.data_threads
    )


def augment_config(config: TrainConfig) -> augment.AugmentConfig | None:
    """The random transform of training batches from the run's flags.

    Args:
      config: the run configuration.

    Returns:
      The AugmentConfig of its augmentation flags, or None with --noaugment.
    """
    if not config.augment:
        return None
    return augment.AugmentConfig(
        rotation_degrees=config.rotation_degrees,
        shift_fraction=config.shift_fraction,
        shear_degrees=config.shear_degrees,
        zoom_fraction=config.zoom_fraction,
        horizontal_flip=config.horizontal_flip,
        fill_mode=config.fill_mode,
    )


def _describe_augmentation(config: TrainConfig) -> str:
    if not config.augment:
        return "off"
    return (
        f"on the device: rotation +-{config.rotation_degrees:g} deg, shift "
        f"+-{config.shift_fraction:g}, shear +-{config.shear_degrees:g} deg, zoom "
        f"+-{config.zoom_fraction:g}, flip {'on' if config.horizontal_flip else 'off'}, "
        f"fill {config.fill_mode}"
    )


def compile_model(model: keras.Model, learning_rate: float, *, jit_compile: bool) -> None:
    """Compiles for sparse integer labels; needed again after changing `trainable`.

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer.
    """
    num_classes = model.output_shape[-1]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=jit_compile,
    )


def _keras_verbosity() -> int:
    """A live progress bar on a terminal; one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def _count_trainable(model: keras.Model) -> int:
    return int(sum(math.prod(weight.shape) for weight in model.trainable_weights))


def _epoch_records(keras_history: dict, timing_records: list[dict]) -> list[dict]:
    """Joins Keras' per-epoch metrics with the meter's timings, one dict per epoch."""
    records = []
    for index, timing_record in enumerate(timing_records):
        record = dict(timing_record)
        record.update({name: float(values[index]) for name, values in keras_history.items()})
        records.append(record)
    return records


def _best_epoch(epochs: list[dict]) -> int | None:
    if not epochs:
        return None
    return max(epochs, key=lambda e: e["val_accuracy"])["epoch"]
