"""Interrupting the binary and resuming it: SIGKILL, SIGTERM, exact --deterministic resume.

Each test runs `python -m effpipe.train` on the smoke recipe in a subprocess and
interrupts it once the resume state records enough completed epochs.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = ("--flagfile=flags/smoke.flags",)


def _start(workdir, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "effpipe.train", *SMOKE, *args, f"--workdir={workdir}"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def _wait_for_epochs(process, workdir, epochs_done, timeout_sec=600):
    """Polls the resume state until `epochs_done` epochs completed (the run still going)."""
    state_file = workdir / "state" / "state.json"
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            if json.loads(state_file.read_text())["epochs_done"] >= epochs_done:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no state with {epochs_done} epochs after {timeout_sec} s")


def _run_to_completion(workdir, *args):
    process = _start(workdir, *args)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads((workdir / "history.json").read_text())


def _epochs(history):
    return [record["epoch"] for record in history["phase1"]], [
        record["epoch"] for record in history["phase2"]
    ]


def test_sigkill_in_phase_1_then_the_same_command_finishes(tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir, "--phase1_epochs=2")
    _wait_for_epochs(process, workdir, 1)
    process.kill()
    process.wait()
    history = _run_to_completion(workdir, "--phase1_epochs=2")
    assert _epochs(history) == ([1, 2], [3])
    assert (workdir / "metrics.json").is_file()


def test_sigkill_in_phase_2_resumes_exactly_with_deterministic(tmp_path):
    args = ("--deterministic", "--phase1_epochs=2", "--phase2_epochs=2")
    uninterrupted = _run_to_completion(tmp_path / "whole", *args)
    workdir = tmp_path / "killed"
    process = _start(workdir, *args)
    _wait_for_epochs(process, workdir, 3)  # Phase 1 and one epoch of phase 2.
    process.kill()
    process.wait()
    resumed = _run_to_completion(workdir, *args)
    assert _epochs(resumed) == ([1, 2], [3, 4])
    # Exact: the same batches, augmentation draws, dropout masks and optimizer state.
    for key in ("loss", "val_loss", "val_accuracy"):
        assert [r[key] for r in resumed["phase1"] + resumed["phase2"]] == [
            r[key] for r in uninterrupted["phase1"] + uninterrupted["phase2"]
        ], key
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    after_kill = json.loads((workdir / "metrics.json").read_text())
    assert (after_kill["top1"], after_kill["loss"]) == (whole["top1"], whole["loss"])


def test_sigterm_stops_cleanly_saying_how_to_resume(tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir, "--phase2_epochs=3")
    _wait_for_epochs(process, workdir, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("effpipe.train: stopped by SIGTERM in epoch")
    assert "rerun the same command to resume" in last_line and "Traceback" not in stderr
    state = json.loads((workdir / "state" / "state.json").read_text())
    assert state["epochs_done"] >= 2 and not (workdir / "metrics.json").exists()
