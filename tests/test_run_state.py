"""RunState and the resume arithmetic, in-process: no subprocess and no model."""

import dataclasses

import pytest

from effpipe.config import TrainConfig
from effpipe.training import phases, run_state

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


def test_the_skipped_batches_are_the_epochs_done_times_the_batches_per_epoch():
    assert run_state.batches_to_skip(0, 25, 1) == 0
    assert run_state.batches_to_skip(3, 25, 1) == 75
    # Each of 4 local replicas takes its own batch of the stream per step.
    assert run_state.batches_to_skip(3, 25, 4) == 300


def test_the_phase_plan_follows_the_config():
    config = TrainConfig.from_flat(
        phase1_epochs=2, phase1_learning_rate=1e-3, phase2_epochs=5, phase2_learning_rate=1e-5
    )
    assert phases.make_phase_plan(config) == (
        phases.Phase(number=1, first_epoch=0, epochs=2, learning_rate=1e-3),
        phases.Phase(number=2, first_epoch=2, epochs=5, learning_rate=1e-5),
    )


def test_a_state_round_trips_through_the_state_file(tmp_path):
    assert run_state.load_state(str(tmp_path)) is None
    state = run_state.RunState(
        phase=2,
        epochs_done=4,
        history={"phase1": [{"epoch": 1, "loss": 1.5}], "phase2": [{"epoch": 4, "loss": 0.5}]},
        best_val_accuracy=0.75,
        checkpoint_written=True,
        weights_file="epoch-0004.weights.h5",
        seeds_file="epoch-0004.seeds.npz",
        best_weights_file="best-epoch-0003.weights.h5",
    )
    run_state.save_state(str(tmp_path), state)
    assert run_state.load_state(str(tmp_path)) == state
    assert (tmp_path / run_state.STATE_DIR / run_state.STATE_FILE).is_file()


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
