"""Resuming an interrupted run from the state of its last completed epoch.

    WORKDIR/state/state.json                 phase, epochs done, history, best so far
    WORKDIR/state/epoch-0003.weights.h5      model and optimizer variables
    WORKDIR/state/epoch-0003.seeds.npz       the random layers' RNG states (dropout,
                                             stochastic depth), which save_weights
                                             leaves out

After every completed epoch `EpochStateSaver` writes the weights, then the seeds,
then state.json, each atomically; state.json names the files it belongs to and the
older epoch's files are deleted only after it moved on, so a kill at any moment
leaves one consistent state. A resumed run loads it into the model of the right
phase (phase 2: unfrozen and recompiled first, so the optimizer's slots match) and
skips the batches already trained: the training stream is endless and seeded, so
epoch k sees the same batches whether or not the run stopped before it.

`StopOnSignal` turns SIGINT and SIGTERM into a clean stop: the current step (or
compiled call of several steps) finishes, then `TrainingInterrupted` propagates; the partial epoch is not saved (a
resumed run redoes it), which keeps a resumed --deterministic run identical to an
uninterrupted one.
"""

import dataclasses
import math
import os
import signal

import keras
import numpy as np
from absl import logging

from effpipe import checkpointing, run_files
from effpipe.errors import TrainingInterrupted, UsageError

STATE_DIR = "state"
STATE_FILE = "state.json"


@dataclasses.dataclass
class RunState:
    """What a run has finished, as of its last completed epoch.

    Attributes:
      phase: the phase of that epoch (1 or 2).
      epochs_done: epochs completed over both phases.
      history: per phase, the epoch records so far (as in history.json).
      best_val_accuracy: best validation accuracy so far, or None.
      checkpoint_written: whether checkpoints/best.weights.h5 is this run's.
      weights_file: the weights file of that epoch, in the state folder.
      seeds_file: the RNG-state file of that epoch, in the state folder.
      best_weights_file: the best weights so far, in the state folder (published
        to checkpoints/best.weights.h5 after this state is written), or None.
    """

    phase: int
    epochs_done: int
    history: dict
    best_val_accuracy: float | None
    checkpoint_written: bool
    weights_file: str
    seeds_file: str
    best_weights_file: str | None = None


def load_state(workdir: str) -> RunState | None:
    """The saved state of a run, or None when no epoch has completed."""
    path = os.path.join(workdir, STATE_DIR, STATE_FILE)
    if not os.path.exists(path):
        return None
    return RunState(**run_files.read_json(path))


def restore(model: keras.Model, workdir: str, state: RunState) -> None:
    """Loads a state's weights, optimizer variables and RNG states into `model`.

    The model must be in the state's phase and compiled: its optimizer is built
    here so that its slot variables exist to load into.
    """
    folder = os.path.join(workdir, STATE_DIR)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(folder, state.weights_file))
    with np.load(os.path.join(folder, state.seeds_file)) as seeds:
        values, variables = _ordered(seeds), _seed_states(model)
        if len(values) != len(variables):
            raise UsageError(
                f"{folder} holds {len(values)} RNG states for a model with "
                f"{len(variables)}: it belongs to another model; pass --overwrite"
            )
        for variable, value in zip(variables, values):
            variable.assign(value)
    logging.info(
        "resumed from %s: phase %d, %d epochs done", folder, state.phase, state.epochs_done
    )


def publish_best(workdir: str, state: RunState, checkpoint_path: str) -> None:
    """Publishes the state's best weights to `checkpoint_path` again.

    A run killed after writing state.json and before publishing left the published
    checkpoint one improvement behind; the resumed run calls this first.
    """
    if state.best_weights_file is not None:
        checkpointing.publish_staged(
            os.path.join(workdir, STATE_DIR, state.best_weights_file), checkpoint_path
        )


def _seed_states(model: keras.Model) -> list:
    """The RNG-state variables of the model's random layers, in a fixed order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _ordered(seeds) -> list:
    return [seeds[f"seed_{index}"] for index in range(len(seeds.files))]


class EpochStateSaver(keras.callbacks.Callback):
    """Records each completed epoch in `history` and saves the run's state.

    Epochs whose loss is not finite are recorded but not saved: a resumed run starts
    from the last finite one.

    Args:
      workdir: the run directory.
      phase: the phase being trained.
      history: {"phase1": [...], "phase2": [...]}, appended to in place.
      meter: the run's ThroughputMeter (its last record is the epoch's timing).
      best_checkpoint: the phase's BestCheckpoint (best value, whether it saved).
      checkpoint_written: whether an earlier phase or run wrote the best checkpoint.
      model_to_save: the model whose weights, optimizer and RNG states are saved; by
        default the model being fit (phase 1 on cached features fits a head model
        that shares the full model's head layers and optimizer, and saves the full
        one, so the state is the same whether or not the cache is on).
    """

    def __init__(
        self,
        workdir,
        phase,
        history,
        meter,
        best_checkpoint,
        checkpoint_written,
        model_to_save=None,
    ):
        super().__init__()
        self.model_to_save = model_to_save
        self.folder = os.path.join(workdir, STATE_DIR)
        self.phase = phase
        self.history = history
        self.meter = meter
        self.best_checkpoint = best_checkpoint
        self.checkpoint_written = checkpoint_written

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        # The meter's record carries the epoch number and its timings.
        record = {**{k: float(v) for k, v in logs.items()}, **self.meter.records[-1]}
        self.history[f"phase{self.phase}"].append(record)
        if not math.isfinite(logs.get("loss", math.nan)):
            return
        stem = f"epoch-{epoch + 1:04d}"
        weights_file, seeds_file = f"{stem}.weights.h5", f"{stem}.seeds.npz"
        model = self.model_to_save or self.model
        run_files.write_atomically(os.path.join(self.folder, weights_file), model.save_weights)
        seeds = {f"seed_{i}": np.asarray(v.numpy()) for i, v in enumerate(_seed_states(model))}
        run_files.write_atomically(
            os.path.join(self.folder, seeds_file), lambda path: np.savez(path, **seeds)
        )
        state = RunState(
            phase=self.phase,
            epochs_done=epoch + 1,
            history=self.history,
            best_val_accuracy=self.best_checkpoint.best,
            checkpoint_written=self.checkpoint_written or self.best_checkpoint.saved,
            weights_file=weights_file,
            seeds_file=seeds_file,
            best_weights_file=self.best_checkpoint.staged_file,
        )
        run_files.write_json(os.path.join(self.folder, STATE_FILE), dataclasses.asdict(state))
        # The state now names the best weights: publishing them cannot run ahead of it.
        self.best_checkpoint.publish()
        for name in os.listdir(self.folder):
            stale_epoch = name.startswith("epoch-") and not name.startswith(stem)
            stale_best = name.startswith("best-epoch-") and name != state.best_weights_file
            if stale_epoch or stale_best:
                os.remove(os.path.join(self.folder, name))


class StopOnSignal(keras.callbacks.Callback):
    """SIGINT or SIGTERM: finish the current step, then raise TrainingInterrupted.

    Use as a context manager around all the training and evaluation work (the
    handlers are installed on entry and always restored on exit) and as a callback
    of every `fit`, `evaluate` and `predict` (it checks before each compiled call); call
    `check()` between phases. A second SIGINT falls back to KeyboardInterrupt.
    With `steps_per_execution` = N the current call's N steps finish first.

    Args:
      workdir: the run directory, named in the message.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir
        self.received = None
        self.epoch = None
        self._previous = {}

    def __enter__(self):
        self._previous = {number: signal.getsignal(number) for number in self.SIGNALS}
        for number in self.SIGNALS:
            signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False

    def _handle(self, number, frame):
        self.received = number
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    # Checked before each compiled call rather than after: Keras calls the begin
    # hooks without the step's results, so the check adds no wait for the device.
    def on_train_batch_begin(self, batch, logs=None):
        self.check()

    def on_test_batch_begin(self, batch, logs=None):
        # Validation is part of the epoch: stopping in it loses only that epoch.
        self.check()

    def on_predict_batch_begin(self, batch, logs=None):
        # Computing phase 1's cached features: nothing of them is saved yet.
        self.check()

    def check(self) -> None:
        """Raises TrainingInterrupted if a signal arrived."""
        if self.received is None:
            return
        name = signal.Signals(self.received).name
        state = load_state(self.workdir)
        saved = (
            f"the state after epoch {state.epochs_done} is saved"
            if state
            else "no epoch had completed, so nothing is saved"
        )
        where = f" in epoch {self.epoch}" if self.epoch else ""
        raise TrainingInterrupted(
            f"stopped by {name}{where}; {saved} in "
            f"{os.path.join(self.workdir, STATE_DIR)}: rerun the same command to resume",
            self.received,
        )
