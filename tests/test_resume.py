"""Interrupting the binary and resuming it: SIGTERM, SIGKILL, a damaged newest state,
and the exact resume of --deterministic.

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


# A recipe with a schedule in each phase, AdamW and label smoothing: the resumed run
# must continue the schedule where the killed one stood.
SCHEDULED = (
    *("--lr_schedule=cosine", "--warmup_epochs=0.5", "--optimizer=adamw"),
    *("--weight_decay=0.01", "--label_smoothing=0.1"),
)


def test_sigterm_in_phase_1_then_sigkill_in_phase_2_and_the_run_ends_exactly_as_uninterrupted(
    tmp_path,
):
    """One run stopped twice (SIGTERM in phase 1, SIGKILL in phase 2 with its newest
    state damaged) and rerun each time with the same command, against the same run
    uninterrupted: with --deterministic every figure is equal, to the last bit."""
    args = ("--deterministic", "--phase1_epochs=3", "--phase2_epochs=3", *SCHEDULED)
    uninterrupted, _ = _run_to_completion(tmp_path / "whole", *args)
    workdir = tmp_path / "run"
    # SIGTERM: the current step finishes, one line says how to resume.
    process = _start(workdir, *args)
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
    assert 1 <= stopped_at < 3 and not (workdir / "metrics.json").exists()
    # The same command resumes; SIGKILL it once phase 2 has two epochs done.
    process = _start(workdir, *args, log_name="resumed.txt")
    _wait_for_epochs(process, workdir, 5)
    _kill(process, workdir)
    assert f"phase 1, {stopped_at} epochs done" in process.log_path.read_text()
    done = json.loads((state_dir / "state.json").read_text())["epochs_done"]
    before_kill = json.loads((state_dir / "state.json").read_text())["history"]
    # The kill also damaged the newest weights, as a full disk would: the rerun
    # falls back to the epoch before (mid phase 2), which the state folder keeps.
    newest = state_dir / f"epoch-{done:04d}.weights.h5"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed, log = _run_to_completion(workdir, *args, log_name="rerun.txt")
    assert "the newest resume state is damaged" in log and str(newest) in log
    assert f"phase 2, {done - 1} epochs done" in log
    # It resumed (a fresh start would be identical under --deterministic, too): the
    # epochs before the kill keep the timings of the killed process.
    assert resumed["phase1"] == before_kill["phase1"]
    assert _epochs(resumed) == ([1, 2, 3], [4, 5, 6])
    # Exact: the same batches, augmentation draws, dropout masks and optimizer state.
    for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        assert [r[key] for r in resumed["phase1"] + resumed["phase2"]] == [
            r[key] for r in uninterrupted["phase1"] + uninterrupted["phase2"]
        ], key
    # Each phase warms up and decays over its own epochs: its last epoch ends near
    # the cosine's floor (0), well below the first (smoke: 1e-3 and 1e-4).
    for phase, rate in (("phase1", 1e-3), ("phase2", 1e-4)):
        first, last = (resumed[phase][index]["learning_rate"] for index in (0, -1))
        assert 0 < last < 0.1 * rate < first <= rate, (phase, first, last)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    after_kill = json.loads((workdir / "metrics.json").read_text())
    assert (after_kill["top1"], after_kill["loss"]) == (whole["top1"], whole["loss"])
    # The last two epochs' states stay, no more.
    assert sorted(path.name for path in state_dir.glob("epoch-*")) == [
        f"epoch-{epoch:04d}{suffix}"
        for epoch in (5, 6)
        for suffix in (".seeds.npz", ".state.json", ".weights.h5")
    ]
