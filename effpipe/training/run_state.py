"""The resume state of a run: the single record of its progress, saved every epoch.

`RunState` says what a run has finished: the phase and epochs done, the history,
the best validation accuracy and its weights. `EpochStateSaver` updates it and
saves it (with the epoch's weights, optimizer variables and RNG states) under
WORKDIR/state after every finite epoch, keeping the epoch before too, the fallback
when the newest state is damaged; a rerun of the same command loads it
(`load_state`), restores the model (`restore`) and continues from `resume_point`.
Its training stream starts at that epoch, whose order the seed and the epoch alone
define (`effpipe.data.pipeline`), so it sees the batches an uninterrupted run sees.
"""

import dataclasses
import math
import os

import h5py
import keras
import numpy as np
from absl import logging

from effpipe import run_dir
from effpipe.errors import UsageError
from effpipe.training import checkpoints, optimization

STATE_DIR = "state"
STATE_FILE = "state.json"
# Each epoch's state beside its files (epoch-0003.state.json): the fallback when the
# newest is damaged.
EPOCH_STATE_SUFFIX = ".state.json"


@dataclasses.dataclass
class RunState:
    """What a run has finished, as of its last completed epoch.

    Attributes:
      phase: the phase of that epoch (1 or 2); 0 before any epoch completed.
      epochs_done: epochs completed over both phases.
      history: per phase, the epoch records so far (as in history.json).
      best_val_accuracy: best validation accuracy so far, or None.
      checkpoint_written: whether checkpoints/best.weights.h5 is this run's.
      weights_file: the weights file of that epoch, in the state folder, or None.
      seeds_file: the RNG-state file of that epoch, in the state folder, or None.
      best_weights_file: the best weights so far, in the state folder (published
        to checkpoints/best.weights.h5 after this state is written), or None.
    """

    phase: int
    epochs_done: int
    history: dict
    best_val_accuracy: float | None
    checkpoint_written: bool
    weights_file: str | None
    seeds_file: str | None
    best_weights_file: str | None = None

    @classmethod
    def fresh(cls) -> "RunState":
        """The state of a run that has completed no epoch."""
        return cls(
            phase=0,
            epochs_done=0,
            history={"phase1": [], "phase2": []},
            best_val_accuracy=None,
            checkpoint_written=False,
            weights_file=None,
            seeds_file=None,
        )


def resume_point(state: RunState, phase: int, first_epoch: int, epochs: int) -> int | None:
    """The epoch a phase starts from, or None when the state has finished it.

    Epochs count over both phases from 0, as Keras' `initial_epoch` does: phase 2
    of a 10 + 10 epoch run is epochs 10..19.

    Args:
      state: the run's state.
      phase: the phase (1 or 2).
      first_epoch: the phase's first epoch over both phases.
      epochs: the phase's epochs.

    Returns:
      The phase's `initial_epoch` for `fit`, or None when it has nothing left.
    """
    if state.phase > phase:
        return None
    initial_epoch = max(first_epoch, state.epochs_done)
    return None if initial_epoch >= first_epoch + epochs else initial_epoch


def load_state(workdir: str) -> RunState | None:
    """The saved state of a run: its last intact epoch state.

    The state folder keeps the last two epochs' states (`epoch-N.state.json` beside
    their weights and RNG states; `state.json` is the newest). A state that does not
    parse, or whose files are missing, truncated or unreadable (a full disk, a crash
    of the filesystem), is passed over, with a warning, for the one before it.

    Args:
      workdir: the run directory.

    Returns:
      The state of its last intact epoch, or None when no epoch has completed.

    Raises:
      UsageError: states were saved but none is intact: the line names the
        damaged file and --overwrite.
    """
    folder = os.path.join(workdir, STATE_DIR)
    candidates = [os.path.join(folder, STATE_FILE)] + sorted(
        (
            os.path.join(folder, name)
            for name in (os.listdir(folder) if os.path.isdir(folder) else [])
            if name.startswith("epoch-") and name.endswith(EPOCH_STATE_SUFFIX)
        ),
        reverse=True,
    )
    candidates = [path for path in candidates if os.path.exists(path)]
    damage = []
    for path in candidates:
        state, problem = _read_intact(folder, path)
        if state is None:
            damage.append(problem)
            continue
        if damage:
            logging.warning(
                "the newest resume state is damaged (%s): resuming from the state after "
                "epoch %d instead",
                damage[0],
                state.epochs_done,
            )
        return state
    if damage:
        raise UsageError(
            f"no intact resume state in {folder}: {damage[0]}; pass --overwrite to "
            "start the run afresh"
        )
    return None


def _read_intact(folder: str, path: str) -> tuple[RunState | None, str]:
    """The state in `path` if it parses and its files read whole; else (None, why)."""
    try:
        state = RunState(**run_dir.read_json(path))
    except (OSError, ValueError, TypeError) as error:
        return None, f"{path} does not parse ({error})"
    files = [state.weights_file, state.seeds_file, state.best_weights_file]
    for name in filter(None, files):
        file_path = os.path.join(folder, name)
        try:
            if name.endswith(".npz"):
                with np.load(file_path) as arrays:
                    [arrays[key] for key in arrays.files]
            else:
                with h5py.File(file_path, "r") as weights:
                    weights.visititems(_read_dataset)
        except FileNotFoundError:
            return None, f"{file_path}, which {path} names, is missing"
        except Exception as error:  # h5py and numpy raise many kinds on a damaged file.
            return None, f"{file_path} is unreadable ({type(error).__name__}: {error})"
    return state, ""


def _read_dataset(name, item) -> None:
    if isinstance(item, h5py.Dataset):
        item[()]


def save_state(workdir: str, state: RunState) -> None:
    """Writes `state` to the run's state file, atomically.

    Args:
      workdir: the folder holding the state folder (this process's output folder).
      state: the state to write.
    """
    run_dir.write_json(os.path.join(workdir, STATE_DIR, STATE_FILE), dataclasses.asdict(state))


def restore(model: keras.Model, workdir: str, state: RunState) -> None:
    """Loads a state's weights, optimizer variables and RNG states into `model`.

    The model must be in the state's phase and compiled: its optimizer is built
    here so that its slot variables exist to load into.

    Args:
      model: the full model.
      workdir: the run directory holding the state folder.
      state: the state whose files to load.

    Raises:
      UsageError: the state's RNG states belong to another model.
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

    Args:
      workdir: the run directory holding the state folder.
      state: the loaded state; a fresh one publishes nothing.
      checkpoint_path: the published best-weights checkpoint.
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
    """Records each completed epoch in the run's `RunState` and saves it.

    Epochs whose loss is not finite are recorded in the history but not saved: a
    resumed run starts from the last finite one.

    Args:
      workdir: the run directory.
      phase: the phase being trained.
      state: the run's state, updated in place (its history appended to).
      meter: the run's ThroughputMeter (its last record is the epoch's timing).
      best_checkpoint: the phase's BestCheckpoint (best value, whether it saved).
      model_to_save: the model whose weights, optimizer and RNG states are saved; by
        default the model being fit (phase 1 on cached features fits a head model
        that shares the full model's head layers and optimizer, and saves the full
        one, so the state is the same whether or not the cache is on).
      learning_rate: the phase's rate or schedule (`optimization.make_learning_rate`);
        each record's `learning_rate` is its value at the epoch's last step.
    """

    def __init__(
        self, workdir, phase, state, meter, best_checkpoint, model_to_save=None, learning_rate=None
    ):
        super().__init__()
        self.learning_rate = learning_rate
        self.model_to_save = model_to_save
        self.workdir = workdir
        self.folder = os.path.join(workdir, STATE_DIR)
        self.phase = phase
        self.state = state
        self.meter = meter
        self.best_checkpoint = best_checkpoint

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        # The meter's record carries the epoch number and its timings.
        record = {**{k: float(v) for k, v in logs.items()}, **self.meter.records[-1]}
        model = self.model_to_save or self.model
        if self.learning_rate is not None:
            # The optimizer has counted the epoch's steps; its last update used the
            # rate of the step before the count.
            last_step = max(int(model.optimizer.iterations.numpy()) - 1, 0)
            record["learning_rate"] = optimization.rate_at(self.learning_rate, last_step)
        self.state.history[f"phase{self.phase}"].append(record)
        if not math.isfinite(logs.get("loss", math.nan)):
            return
        stem = f"epoch-{epoch + 1:04d}"
        weights_file, seeds_file = f"{stem}.weights.h5", f"{stem}.seeds.npz"
        run_dir.write_atomically(os.path.join(self.folder, weights_file), model.save_weights)
        seeds = {f"seed_{i}": np.asarray(v.numpy()) for i, v in enumerate(_seed_states(model))}
        run_dir.write_atomically(
            os.path.join(self.folder, seeds_file), lambda path: np.savez(path, **seeds)
        )
        state, checkpoint = self.state, self.best_checkpoint
        # The previous epoch's files stay: the fallback if this epoch's are damaged.
        kept = {state.weights_file, state.seeds_file, state.best_weights_file}
        if state.weights_file:
            kept.add(state.weights_file.replace(".weights.h5", EPOCH_STATE_SUFFIX))
        state.phase, state.epochs_done = self.phase, epoch + 1
        state.best_val_accuracy = checkpoint.best
        state.checkpoint_written = state.checkpoint_written or checkpoint.saved
        state.weights_file, state.seeds_file = weights_file, seeds_file
        state.best_weights_file = checkpoint.staged_file
        epoch_state = f"{stem}{EPOCH_STATE_SUFFIX}"
        run_dir.write_json(os.path.join(self.folder, epoch_state), dataclasses.asdict(state))
        save_state(self.workdir, state)
        # The state now names the best weights: publishing them cannot run ahead of it.
        checkpoint.publish()
        kept |= {weights_file, seeds_file, epoch_state, state.best_weights_file}
        for name in os.listdir(self.folder):
            stale = name.startswith(("epoch-", "best-epoch-")) and name not in kept
            if stale:
                os.remove(os.path.join(self.folder, name))
