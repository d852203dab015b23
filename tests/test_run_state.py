"""RunState, the resume arithmetic and the fallback from a damaged state, in-process:
no subprocess and no model."""

import dataclasses
import logging
import signal

import h5py
import numpy as np
import pytest

from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.errors import TrainingInterrupted, UsageError
from effpipe.training import callbacks, phases, run_state

# Phase 1 is epochs 0..2 and phase 2 epochs 3..6, counted from 0 over both phases.
PHASE1 = dict(phase=1, first_epoch=0, epochs=3)
PHASE2 = dict(phase=2, first_epoch=3, epochs=4)


def _state(phase, epochs_done):
    return dataclasses.replace(run_state.RunState.fresh(), phase=phase, epochs_done=epochs_done)


def test_a_fresh_run_starts_each_phase_at_its_first_epoch():
    fresh = run_state.RunState.fresh()
    assert (fresh.phase, fresh.epochs_done, fresh.history) == (0, 0, {"phase1": [], "phase2": []})
    assert run_state.resume_point(fresh, **PHASE1) == 0
    assert run_state.resume_point(fresh, **PHASE2) == 3


@pytest.mark.parametrize(
    "phase, epochs_done, phase1_start, phase2_start",
    [
        (1, 1, 1, 3),  # Killed in phase 1: it goes on, then phase 2 from its start.
        (1, 3, None, 3),  # Phase 1 done, killed before phase 2's first epoch ended.
        (2, 5, None, 5),  # Killed in phase 2: phase 1 is skipped.
        (2, 7, None, None),  # Killed after training, before the evaluation.
    ],
)
def test_a_resumed_run_starts_after_its_last_saved_epoch(
    phase, epochs_done, phase1_start, phase2_start
):
    state = _state(phase, epochs_done)
    assert run_state.resume_point(state, **PHASE1) == phase1_start
    assert run_state.resume_point(state, **PHASE2) == phase2_start


def test_a_phase_the_state_has_passed_is_done_whatever_its_epochs():
    # A resumed run may not change the epochs, but a later phase's state alone says
    # that phase 1 is over.
    assert run_state.resume_point(_state(2, 3), phase=1, first_epoch=0, epochs=10) is None


def test_a_phase_of_0_epochs_has_nothing_to_run():
    fresh = run_state.RunState.fresh()
    assert run_state.resume_point(fresh, phase=2, first_epoch=3, epochs=0) is None


def test_the_phase_plan_follows_the_config():
    config = TrainConfig.from_flat(
        phase1_epochs=2, phase1_learning_rate=1e-3, phase2_epochs=5, phase2_learning_rate=1e-5
    )
    assert phases.make_phase_plan(config) == (
        phases.Phase(number=1, first_epoch=0, epochs=2, learning_rate=1e-3),
        phases.Phase(number=2, first_epoch=2, epochs=5, learning_rate=1e-5),
    )


def _save_epoch(workdir, epochs_done, best_epoch=None):
    """Writes an epoch's state as EpochStateSaver lays it out: weights, RNG states,
    best weights, epoch-N.state.json and state.json."""
    folder = workdir / run_state.STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"epoch-{epochs_done:04d}"
    best = f"best-epoch-{best_epoch or epochs_done:04d}.weights.h5"
    for name in (f"{stem}.weights.h5", best):
        with h5py.File(folder / name, "w") as weights:
            weights.create_dataset("layers/dense/vars/0", data=np.full((64, 64), epochs_done))
    np.savez(folder / f"{stem}.seeds.npz", seed_0=np.arange(2))
    state = run_state.RunState(
        phase=2,
        epochs_done=epochs_done,
        history={"phase1": [{"epoch": 1, "loss": 1.5}], "phase2": [{"epoch": 4, "loss": 0.5}]},
        best_val_accuracy=0.75,
        checkpoint_written=True,
        weights_file=f"{stem}.weights.h5",
        seeds_file=f"{stem}.seeds.npz",
        best_weights_file=best,
    )
    run_dir.write_json(folder / f"{stem}{run_state.EPOCH_STATE_SUFFIX}", dataclasses.asdict(state))
    run_state.save_state(str(workdir), state)
    return state


def test_a_state_round_trips_through_the_state_file(tmp_path):
    assert run_state.load_state(str(tmp_path)) is None
    state = _save_epoch(tmp_path, 4)
    assert run_state.load_state(str(tmp_path)) == state
    assert (tmp_path / run_state.STATE_DIR / run_state.STATE_FILE).is_file()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, falls_back",
    [
        # The newest weights cut short, as a full disk leaves them: the epoch before.
        (lambda folder: _truncate(folder / "epoch-0004.weights.h5"), True),
        (lambda folder: _truncate(folder / "epoch-0004.seeds.npz"), True),
        (lambda folder: (folder / "epoch-0004.weights.h5").unlink(), True),
        (lambda folder: _truncate(folder / "best-epoch-0004.weights.h5"), True),
        # state.json itself unreadable: the same epoch's own copy, whose files are whole.
        (lambda folder: (folder / "state.json").write_text('{"phase": 2, "epo'), False),
        (lambda folder: (folder / "state.json").write_text('{"phase": 2}'), False),
    ],
)
def test_a_damaged_newest_state_falls_back_to_the_last_intact_one(
    tmp_path, damage, falls_back, caplog
):
    previous = _save_epoch(tmp_path, 3)
    newest = _save_epoch(tmp_path, 4)
    damage(tmp_path / run_state.STATE_DIR)
    with caplog.at_level(logging.WARNING):
        loaded = run_state.load_state(str(tmp_path))
    assert loaded == (previous if falls_back else newest)
    assert "the newest resume state is damaged" in caplog.text


def test_with_no_intact_state_the_line_names_the_file_and_overwrite(tmp_path):
    _save_epoch(tmp_path, 3)
    _save_epoch(tmp_path, 4, best_epoch=3)
    folder = tmp_path / run_state.STATE_DIR
    _truncate(folder / "best-epoch-0003.weights.h5")  # The best weights both name.
    with pytest.raises(UsageError) as raised:
        run_state.load_state(str(tmp_path))
    message = str(raised.value)
    assert f"no intact resume state in {folder}" in message
    assert "best-epoch-0003.weights.h5 is unreadable" in message
    assert "pass --overwrite" in message and "\n" not in message


def test_the_kept_weights_message_follows_the_state_and_a_fit_in_progress():
    path = "run/checkpoints/best.weights.h5"
    fresh = run_state.RunState.fresh()
    assert phases.kept_weights_message(path, fresh).startswith("No checkpoint was written")
    saved = dataclasses.replace(fresh, checkpoint_written=True, best_val_accuracy=0.5)
    assert phases.kept_weights_message(path, saved) == (
        f"The best weights so far (validation accuracy 0.5000) are kept in {path}."
    )
    # Mid-fit the phase's checkpoint can be one epoch ahead of the saved state.
    checkpoint = type("Checkpoint", (), {"saved": True, "best": 0.625})()
    assert "validation accuracy 0.6250" in phases.kept_weights_message(path, fresh, checkpoint)


def test_a_signal_over_a_damaged_state_still_stops_saying_so(tmp_path):
    _save_epoch(tmp_path, 4)
    (tmp_path / run_state.STATE_DIR / "epoch-0004.weights.h5").write_bytes(b"")
    stop = callbacks.StopOnSignal(str(tmp_path))
    stop.received, stop.epoch = signal.SIGTERM, 5
    with pytest.raises(TrainingInterrupted) as raised:
        stop.check()
    assert "stopped by SIGTERM in epoch 5; no intact state is saved" in str(raised.value)
    assert raised.value.signal_number == signal.SIGTERM
