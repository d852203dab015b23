"""TODO docstring for training.run_state."""

import dataclasses
import math
import os

import keras
import numpy as np
from absl import logging

from effpipe import run_dir
from effpipe.errors import UsageError
from effpipe.training import checkpoints

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
    return RunState(**run_dir.read_json(path))


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
        checkpoints.publish_staged(
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
        run_dir.write_atomically(os.path.join(self.folder, weights_file), model.save_weights)
        seeds = {f"seed_{i}": np.asarray(v.numpy()) for i, v in enumerate(_seed_states(model))}
        run_dir.write_atomically(
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
        run_dir.write_json(os.path.join(self.folder, STATE_FILE), dataclasses.asdict(state))
        # The state now names the best weights: publishing them cannot run ahead of it.
        self.best_checkpoint.publish()
        for name in os.listdir(self.folder):
            stale_epoch = name.startswith("epoch-") and not name.startswith(stem)
            stale_best = name.startswith("best-epoch-") and name != state.best_weights_file
            if stale_epoch or stale_best:
                os.remove(os.path.join(self.folder, name))
