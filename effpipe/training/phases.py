"""One training phase: the phase plan, `run_phase` and the callbacks of its `fit`.

Phase 1 trains the head on a frozen base (on the base's cached pooled features
when the feature cache is on); phase 2 unfreezes the top blocks and trains on at a
lower learning rate. `run_phase` runs either, from the run's `RunState`: it skips
what the state has finished, restores what it has started, and the phase's
`EpochStateSaver` records every epoch in it.
"""

import dataclasses
import functools
import math
import os

import keras
from absl import logging

from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.errors import UsageError
from effpipe.model import factory, freezing
from effpipe.outputs import plots
from effpipe.training import (
    callbacks,
    checkpoints,
    failures,
    inputs,
    optimization,
    phase1_features,
    run_state,
    runtime,
    summaries,
)
from effpipe.training import distribution as distribution_lib


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of the plan.

    Attributes:
      number: 1 or 2.
      first_epoch: its first epoch, counted from 0 over both phases.
      epochs: its epochs (0 skips it).
      learning_rate: its learning rate, scaled for the batch size.
    """

    number: int
    first_epoch: int
    epochs: int
    learning_rate: float


def make_phase_plan(config: TrainConfig) -> tuple[Phase, ...]:
    """The run's phases in order: the head on a frozen base, then the top blocks.

    Args:
      config: the run configuration.

    Returns:
      Phase 1 and phase 2.
    """
    recipe = config.phases
    return (
        Phase(1, 0, recipe.phase1_epochs, config.learning_rate(1)),
        Phase(2, recipe.phase1_epochs, recipe.phase2_epochs, config.learning_rate(2)),
    )


@dataclasses.dataclass(frozen=True)
class PhaseContext:
    """What every phase of one run shares, made once by the trainer.

    Attributes:
      config: the run configuration.
      setup: the resolved runtime (device, precision, XLA).
      distribution: the run's strategy and this process's part in it.
      workdir: the run directory, where the resume state is read.
      output_dir: where this process writes (the chief's is `workdir`).
      data: the run's splits, validation dataset and training streams.
      use_feature_cache: whether phase 1 trains on cached pooled features.
      meter: the run's ThroughputMeter.
      stop_on_signal: the run's StopOnSignal, entered by the trainer.
      calibration_callbacks: the BatchNormalization calibration callbacks of a base
        trained from scratch, or ().
    """

    config: TrainConfig
    setup: runtime.Runtime
    distribution: distribution_lib.Distribution
    workdir: str
    output_dir: str
    data: inputs.RunData
    use_feature_cache: bool
    meter: callbacks.ThroughputMeter
    stop_on_signal: callbacks.StopOnSignal
    calibration_callbacks: tuple = ()

    @property
    def checkpoint_path(self) -> str:
        """This process's best-weights checkpoint."""
        return os.path.join(self.output_dir, checkpoints.BEST_CHECKPOINT)


def run_phase(
    phase: Phase, model: keras.Model, state: run_state.RunState, context: PhaseContext
) -> int | None:
    """Trains one phase from where `state` stands; the phase's saver updates `state`.

    Args:
      phase: the phase to run.
      model: the full model, built in the strategy's scope.
      state: the run's state, updated in place after every completed epoch.
      context: what the run's phases share.

    Returns:
      The phase's resolved steps per execution, or None when the phase was skipped
      before compiling (finished before a resume, or 0 epochs).

    Raises:
      UsageError: the loss became NaN or infinite, or the device ran out of memory.
      TrainingInterrupted: SIGINT or SIGTERM arrived.
    """
    config = context.config
    context.stop_on_signal.check()
    if state.phase > phase.number:
        return None  # Finished before the interruption.
    context.meter.start_phase(phase.number)
    unfrozen = freezing.set_phase(
        model,
        phase.number,
        unfreeze_blocks=config.phases.unfreeze_blocks,
        from_scratch=config.model.weights == "none",
    )
    if phase.number == 2:
        logging.info(
            "phase 2 unfreezes blocks %s and the top conv; BatchNormalization %s",
            ", ".join(unfrozen),
            "trains (--weights=none)" if config.model.weights == "none" else "stays frozen",
        )
    if phase.epochs == 0:
        logging.info("phase %d: 0 epochs, skipped", phase.number)
        return None
    # One rate or schedule for the phase: the optimizer's, and the history's record.
    learning_rate = optimization.make_learning_rate(
        config, phase.number, context.data.steps_per_epoch
    )
    steps_per_execution = _compile_and_restore(phase, model, state, context, learning_rate)
    initial_epoch = run_state.resume_point(state, phase.number, phase.first_epoch, phase.epochs)
    if initial_epoch is None:
        logging.info("phase %d: already done (%d epochs)", phase.number, phase.epochs)
        return steps_per_execution
    logging.info(
        "phase %d: epochs %d..%d, %s, %d trainable parameters",
        phase.number,
        initial_epoch + 1,
        phase.first_epoch + phase.epochs,
        optimization.describe(config, phase.number),
        _count_trainable(model),
    )
    fit_model, train_dataset, validation_dataset, input_callbacks = _fit_inputs(
        phase, model, state, context, initial_epoch, steps_per_execution
    )
    # The checkpoint and the state hold the full model, whichever model fits.
    checkpoint = checkpoints.BestCheckpoint(
        context.checkpoint_path,
        monitor="val_accuracy",
        best=state.best_val_accuracy,
        model_to_save=model,
        staging_dir=os.path.join(context.output_dir, run_state.STATE_DIR),
        staged_file=state.best_weights_file,
    )
    kept_so_far = functools.partial(
        kept_weights_message, context.checkpoint_path, state, checkpoint
    )
    with failures.device_errors_as_usage_errors(config, context.setup, kept_so_far):
        fit_model.fit(
            train_dataset,
            steps_per_epoch=context.data.steps_per_epoch,
            validation_data=validation_dataset,
            initial_epoch=initial_epoch,
            epochs=phase.first_epoch + phase.epochs,
            callbacks=make_callbacks(
                context, phase, model, state, checkpoint, input_callbacks, learning_rate
            ),
            verbose=callbacks.keras_verbosity(),
            shuffle=False,
        )
    _check_finite_loss(phase, state, context)
    return steps_per_execution


def _compile_and_restore(phase, model, state, context, learning_rate) -> int:
    """Compiles `model` for the phase with a new optimizer at `learning_rate` (a rate
    or a schedule) and restores the state's epoch if it is this phase's; returns the
    phase's resolved steps per execution."""
    config, setup = context.config, context.setup
    head_only = phase.number == 1 and context.use_feature_cache
    steps_per_execution, reason = runtime.resolve_steps_per_execution(
        config, context.data.steps_per_epoch, accelerator=setup.accelerator, head_only=head_only
    )
    logging.info("phase %d: %s", phase.number, reason)
    factory.compile_model(
        model,
        phase.learning_rate,
        jit_compile=setup.xla,
        optimizer=optimization.make_optimizer(config, learning_rate, model),
        steps_per_execution=1 if head_only else steps_per_execution,
        label_smoothing=config.phases.label_smoothing,
    )
    if state.phase == phase.number:
        run_state.restore(model, context.workdir, state)
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            # The saved optimizer holds the constant rate it ran with; a resumed
            # run may lower it (after a NaN loss, say: run_dir allows that). A
            # schedule is rebuilt from the flags and continues from the restored
            # step count.
            model.optimizer.learning_rate.assign(learning_rate)
    return steps_per_execution


def _fit_inputs(phase, model, state, context, initial_epoch, steps_per_execution):
    """The images, or on the feature cache their features in the same order.

    Returns:
      (model to fit, training stream, validation dataset, the phase's own callbacks).
    """
    if not (phase.number == 1 and context.use_feature_cache):
        return (
            model,
            context.data.make_training_stream(phase.number, initial_epoch),
            context.data.validation_dataset,
            context.calibration_callbacks,
        )
    kept_before = functools.partial(kept_weights_message, context.checkpoint_path, state)
    with failures.device_errors_as_usage_errors(context.config, context.setup, kept_before):
        head_model, train_dataset, validation_dataset = phase1_features.cached_phase1_inputs(
            context.config,
            context.setup,
            model,
            context.output_dir,
            context.data.train_split,
            context.data.validation_split,
            context.stop_on_signal,
            steps_per_execution,
            initial_epoch,
        )
    # The features were computed with the base's BatchNormalization statistics of
    # the one calibration when the trainer built the model; the base is frozen, so a
    # recalibration on the same images would change them only by its
    # stochastic-depth draws, and would make the stored features stale. Hence no
    # calibration callbacks here.
    return head_model, train_dataset, validation_dataset, ()


def make_callbacks(
    context, phase, model, state, checkpoint, input_callbacks, learning_rate
) -> list:
    """The callbacks of a phase's `fit`, in the one order every phase uses.

    Args:
      context: what the run's phases share.
      phase: the phase being fit.
      model: the full model (the one saved, whichever model fits).
      state: the run's state, which the phase's EpochStateSaver updates.
      checkpoint: the phase's BestCheckpoint.
      input_callbacks: callbacks that belong to the phase's inputs (the
        BatchNormalization calibration of a random base on images).
      learning_rate: the phase's rate or schedule, whose value at each epoch's last
        step the history records.

    Returns:
      The callback list for `fit`.
    """
    saver = run_state.EpochStateSaver(
        context.output_dir,
        phase.number,
        state,
        context.meter,
        checkpoint,
        model_to_save=model,
        learning_rate=learning_rate,
    )
    # The meter first: calibration work before validation is not
    # training. The checkpoint before the saver, which records its
    # best. TerminateOnNaN stops at the first non-finite loss.
    return [
        context.meter,
        *summaries.make_callbacks(
            context.output_dir,
            phase.number,
            context.meter,
            model,
            context.data.train_split.load_images(summaries.AUGMENTED_IMAGES),
            context.config.outputs.profile_step_range,
        ),
        *input_callbacks,
        checkpoint,
        saver,
        keras.callbacks.TerminateOnNaN(),
        context.stop_on_signal,
        callbacks.KillPoints(),
    ]


def _check_finite_loss(phase: Phase, state: run_state.RunState, context: PhaseContext) -> None:
    """Raises a UsageError when the phase's last epoch ended with a non-finite loss."""
    last = state.history[f"phase{phase.number}"][-1]
    if math.isfinite(last["loss"]):
        return
    write_history(context.output_dir, state.history)
    learning_rate = getattr(context.config.phases, f"phase{phase.number}_learning_rate")
    raise UsageError(
        f"phase {phase.number}: the training loss became {last['loss']} in epoch "
        f"{last['epoch']}; training stopped: lower --phase{phase.number}_learning_rate (now "
        f"{learning_rate:g}) and rerun: the run resumes from its last good epoch. "
        + kept_weights_message(context.checkpoint_path, state)
    )


def write_history(output_dir: str, history: dict) -> None:
    """Writes history.json and its plot, history.png, to `output_dir`.

    Args:
      output_dir: where this process writes.
      history: {"phase1": [...], "phase2": [...]}, the epoch records.
    """
    run_dir.write_json(os.path.join(output_dir, "history.json"), history)
    plots.plot_history(history, os.path.join(output_dir, "history.png"))


def kept_weights_message(
    checkpoint_path: str,
    state: run_state.RunState,
    checkpoint: checkpoints.BestCheckpoint | None = None,
) -> str:
    """Says which best weights a stopped run keeps, for the end of an error message.

    Args:
      checkpoint_path: the best-weights checkpoint.
      state: the run's state as of its last completed epoch.
      checkpoint: the BestCheckpoint of a `fit` in progress, which can be ahead of
        the state by the epoch being saved; None between fits.

    Returns:
      One sentence.
    """
    written = state.checkpoint_written or (checkpoint is not None and checkpoint.saved)
    best = checkpoint.best if checkpoint is not None else state.best_val_accuracy
    if not written:
        return "No checkpoint was written (no finite epoch improved validation accuracy)."
    return (
        f"The best weights so far (validation accuracy {best:.4f}) are kept in {checkpoint_path}."
    )


def _count_trainable(model: keras.Model) -> int:
    return int(sum(math.prod(weight.shape) for weight in model.trainable_weights))
