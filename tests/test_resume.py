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

# The export is the smoke test's to check; these runs skip it, and run the smoke
# recipe at 32 px (its source size): resuming does not depend on the resolution.
SMOKE = ("--flagfile=flags/smoke.flags", "--noexport", "--image_size=32")


def _start(workdir, *args, log_name="log.txt"):
    """Starts the binary; its stderr (absl's log) goes to a file beside the workdir."""
    log_path = workdir.parent / f"{workdir.name}-{log_name}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "effpipe.train", *SMOKE, *args, f"--workdir={workdir}"],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    process.log_path = log_path
    return process


def _wait_for_epochs(process, workdir, epochs_done, timeout_sec=600):
    """Polls the resume state until `epochs_done` epochs completed (the run still going)."""
    state_file = workdir / "state" / "state.json"
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        assert process.poll() is None, process.log_path.read_text()[-3000:]
        try:
            if json.loads(state_file.read_text())["epochs_done"] >= epochs_done:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no state with {epochs_done} epochs after {timeout_sec} s")


def _run_to_completion(workdir, *args, log_name="log.txt"):
    """Runs the binary to its end; returns the history and the log."""
    process = _start(workdir, *args, log_name=log_name)
    process.wait(timeout=900)
    log = process.log_path.read_text()
    assert process.returncode == 0, log[-3000:]
    return json.loads((workdir / "history.json").read_text()), log


def _kill(process, workdir):
    process.kill()
    process.wait()
    # Killed mid-run, not after it had finished.
    assert not (workdir / "metrics.json").exists()


def _epochs(history):
    return [record["epoch"] for record in history["phase1"]], [
        record["epoch"] for record in history["phase2"]
    ]


def test_sigterm_then_sigkill_in_phase_1_and_the_same_command_finishes(tmp_path):
    workdir = tmp_path / "run"
    # SIGTERM: the current step finishes, one line says how to resume.
    process = _start(workdir, "--phase1_epochs=3")
    _wait_for_epochs(process, workdir, 1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stderr = process.log_path.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("effpipe.train: stopped by SIGTERM in epoch")
    assert "rerun the same command to resume" in last_line and "Traceback" not in stderr
    state_dir = workdir / "state"
    stopped_at = json.loads((state_dir / "state.json").read_text())["epochs_done"]
    assert stopped_at >= 1 and not (workdir / "metrics.json").exists()
    # The same command resumes; SIGKILL it an epoch later.
    process = _start(workdir, "--phase1_epochs=3", log_name="resumed.txt")
    _wait_for_epochs(process, workdir, stopped_at + 1)
    _kill(process, workdir)
    assert f"phase 1, {stopped_at} epochs done" in process.log_path.read_text()
    done = json.loads((state_dir / "state.json").read_text())["epochs_done"]
    # The kill also damaged the newest weights, as a full disk would: the rerun
    # falls back to the epoch before, which the state folder keeps.
    newest = state_dir / f"epoch-{done:04d}.weights.h5"
    newest.write_bytes(newest.read_bytes()[:1000])
    history, log = _run_to_completion(workdir, "--phase1_epochs=3", log_name="rerun.txt")
    assert "the newest resume state is damaged" in log and str(newest) in log
    assert f"phase 1, {done - 1} epochs done" in log
    assert _epochs(history) == ([1, 2, 3], [4])
    assert (workdir / "metrics.json").is_file()
    # The last two epochs' states stay, no more.
    assert sorted(path.name for path in state_dir.glob("epoch-*")) == [
        f"epoch-{epoch:04d}{suffix}"
        for epoch in (3, 4)
        for suffix in (".seeds.npz", ".state.json", ".weights.h5")
    ]


# A recipe with a schedule in each phase, AdamW and label smoothing: the resumed run
# must continue the schedule where the killed one stood.
SCHEDULED = (
    *("--lr_schedule=cosine", "--warmup_epochs=0.5", "--optimizer=adamw"),
    *("--weight_decay=0.01", "--label_smoothing=0.1"),
)


def test_sigkill_in_phase_2_resumes_exactly_with_deterministic(tmp_path):
    args = ("--deterministic", "--phase1_epochs=2", "--phase2_epochs=2", *SCHEDULED)
    uninterrupted, _ = _run_to_completion(tmp_path / "whole", *args)
    workdir = tmp_path / "killed"
    process = _start(workdir, *args)
    _wait_for_epochs(process, workdir, 3)  # Phase 1 and one epoch of phase 2.
    _kill(process, workdir)
    before_kill = json.loads((workdir / "state" / "state.json").read_text())["history"]
    resumed, log = _run_to_completion(workdir, *args, log_name="rerun.txt")
    # It resumed (a fresh start would be identical under --deterministic, too): the
    # epochs before the kill keep the timings of the killed process.
    assert "resumed from" in log and "phase 2, 3 epochs done" in log
    assert resumed["phase1"] == before_kill["phase1"]
    assert _epochs(resumed) == ([1, 2], [3, 4])
    # Exact: the same batches, augmentation draws, dropout masks and optimizer state.
    for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        assert [r[key] for r in resumed["phase1"] + resumed["phase2"]] == [
            r[key] for r in uninterrupted["phase1"] + uninterrupted["phase2"]
        ], key
    # Each phase warms up and decays over its own epochs: its second epoch ends near
    # the cosine's floor (0), well below the first (smoke: 1e-3 and 1e-4).
    for phase, rate in (("phase1", 1e-3), ("phase2", 1e-4)):
        first, last = (record["learning_rate"] for record in resumed[phase])
        assert 0 < last < 0.1 * rate < first <= rate, (phase, first, last)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    after_kill = json.loads((workdir / "metrics.json").read_text())
    assert (after_kill["top1"], after_kill["loss"]) == (whole["top1"], whole["loss"])
