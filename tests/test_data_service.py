"""effpipe.data_service: the ready line, usage errors (a port in use among them), a prompt
exit on SIGTERM or SIGINT, and a trainer that stops in one line when the service restarts.

The issue's requirement: the service exits with status 0 within 15 s of the signal,
right after trainers used it and while one still reads from it. TensorFlow's own
server teardown can take up to 60 s per job (see `data_service._exit_without_teardown`).
The trainers here are child processes that read effpipe's input pipeline through the
service, as `effpipe.train --data_service` does, one job per phase.
"""

import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from binaries import check_run_outputs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
# The bound on a stop, from the signal to the exit.
STOP_BOUND_SEC = 15
# Hang guards, far above any normal duration on a loaded 2-core machine: a hang
# fails the test with what it saw instead of blocking the suite.
START_HANG_GUARD_SEC = 180
STOP_HANG_GUARD_SEC = 120
TRAINER_HANG_GUARD_SEC = 300

# A trainer's reads: effpipe's training chain through the service, one job per
# phase. "finish" reads some batches of each job and exits; "keep_reading" reports
# once it has batches, then reads until it is killed.
_TRAINER = """
import sys, time
import numpy as np

from effpipe.data import pipeline

address, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 10, (160,))
streams = [
    iter(pipeline.make_dataset(
        images, labels, batch_size=16, is_training=True,
        data_service=pipeline.DataService(address, f"test-phase{phase}"),
    ))
    for phase in (1, 2)
]
for stream in streams:
    for _ in range(20):
        next(stream)
if mode == "keep_reading":
    print("reading", flush=True)
    while True:
        next(streams[1])
        time.sleep(0.05)
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_data_service(port, log_path, num_workers=1):
    """Starts the service (--role=all) and returns (process, ready line) once it serves."""
    return start_service([f"--port={port}", f"--num_workers={num_workers}"], log_path)


def start_service(service_flags, log_path):
    """Starts effpipe.data_service with `service_flags` and returns (process, ready line)
    once it serves.

    Its stdout is read to the end by a thread, so a full pipe can never block it;
    its stderr goes to `log_path`.
    """
    with open(log_path, "w") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "effpipe.data_service", *service_flags],
            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in service.stdout], daemon=True
    ).start()
    try:
        ready = lines.get(timeout=START_HANG_GUARD_SEC)
    except queue.Empty:
        service.kill()
        service.wait()
        pytest.fail(f"no ready line in {START_HANG_GUARD_SEC} s: {log_path.read_text()[-3000:]}")
    return service, ready


def stop_seconds(service, signal_number, log_path):
    """Sends `signal_number` and returns the seconds until the service exited."""
    start = time.monotonic()
    service.send_signal(signal_number)
    try:
        service.wait(timeout=STOP_HANG_GUARD_SEC)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()
        pytest.fail(
            f"still running {STOP_HANG_GUARD_SEC} s after {signal.Signals(signal_number).name}: "
            f"{log_path.read_text()[-3000:]}"
        )
    return time.monotonic() - start


def _trainer(address, mode, **kwargs):
    return [sys.executable, "-c", _TRAINER, address, mode], dict(cwd=REPO_ROOT, env=ENV, **kwargs)


SIGNALS = pytest.mark.parametrize(
    "signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)


@SIGNALS
def test_the_service_exits_0_within_the_bound_right_after_its_trainer_finished(
    signal_number, tmp_path, record_property
):
    port, log_path = free_port(), tmp_path / "service.log"
    service, ready = start_data_service(port, log_path, num_workers=2)
    try:
        assert (
            ready == f"effpipe.data_service: serving at grpc://localhost:{port} with 2 worker(s)\n"
        )
        command, kwargs = _trainer(f"grpc://localhost:{port}", "finish")
        trainer = subprocess.run(
            command, capture_output=True, text=True, timeout=TRAINER_HANG_GUARD_SEC, **kwargs
        )
        assert trainer.returncode == 0, trainer.stderr[-3000:]
    finally:
        seconds = stop_seconds(service, signal_number, log_path)
    # In the JUnit XML report (--junitxml= -o junit_family=xunit1): the stop times.
    record_property("stop_seconds", round(seconds, 2))
    assert service.returncode == 0, log_path.read_text()[-3000:]
    assert seconds <= STOP_BOUND_SEC
    assert f"{signal.Signals(signal_number).name}: exiting" in log_path.read_text()


@SIGNALS
def test_the_service_exits_0_within_the_bound_while_a_trainer_still_reads(
    signal_number, tmp_path, record_property
):
    port, log_path = free_port(), tmp_path / "service.log"
    service, _ = start_data_service(port, log_path)
    trainer_log_path = tmp_path / "trainer.log"
    command, kwargs = _trainer(f"grpc://localhost:{port}", "keep_reading")
    with open(trainer_log_path, "w") as trainer_log:
        trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=trainer_log, **kwargs)
    try:
        # Hang guard on the trainer's start: its first line says it has batches.
        timer = threading.Timer(TRAINER_HANG_GUARD_SEC, trainer.kill)
        timer.start()
        line = trainer.stdout.readline()
        timer.cancel()
        assert line == b"reading\n", trainer_log_path.read_text()[-3000:]
        assert trainer.poll() is None
    finally:
        seconds = stop_seconds(service, signal_number, log_path)
        trainer.kill()
        trainer.communicate()
    record_property("stop_seconds", round(seconds, 2))
    assert service.returncode == 0, log_path.read_text()[-3000:]
    assert seconds <= STOP_BOUND_SEC


# The service with its check skipped, as when another server takes the port between
# the check and TensorFlow's bind.
_SERVICE_WITHOUT_PORT_CHECK = """
from absl import app
from effpipe import cli_flags, data_service
data_service.check_port_free = lambda port: None
app.run(data_service.main, flags_parser=cli_flags.make_flags_parser(data_service.PROGRAM))
"""


def test_a_port_taken_after_the_check_is_still_one_line_and_exit_status_2():
    with socket.socket() as holder:
        holder.bind(("localhost", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", _SERVICE_WITHOUT_PORT_CHECK, f"--port={port}"],
            cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=START_HANG_GUARD_SEC,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    # TensorFlow logs its own failure first; effpipe's is the one line of its own.
    assert "Traceback" not in result.stderr
    assert [
        line for line in result.stderr.splitlines() if line.startswith("effpipe.data_service:")
    ] == [
        f"effpipe.data_service: error: --port={port} is in use: pass another --port, or stop "
        f"the process holding it (ss -ltnp 'sport = :{port}' names it)"
    ]


def _start_reading_trainer(port, workdir):
    """A smoke trainer (6 phase-1 epochs) reading through the service on `port`, and a
    queue of its stderr lines, ended by None (a thread reads them: a full pipe would
    block the trainer)."""
    trainer = subprocess.Popen(
        [sys.executable, "-m", "effpipe.train", "--flagfile=flags/smoke.flags",
         "--image_size=32", "--noexport", "--phase1_epochs=6", "--phase2_epochs=0",
         f"--workdir={workdir}", f"--data_service=grpc://localhost:{port}"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in trainer.stderr] + [lines.put(None)],
        daemon=True,
    ).start()
    return trainer, lines


def test_a_trainer_stops_in_one_line_when_its_service_restarts(tmp_path):
    """SIGKILL of the service in the middle of phase 1, then a restart on its port.

    The new dispatcher does not know the run's job: the trainer's next heartbeat to it
    fails, and the trainer stops with one line and status 1 instead of a traceback.
    Phase 1 has 6 epochs of 5 steps, more than the trainer's read-ahead (up to 3
    epochs were seen), so it needs the restarted service.
    """
    port, workdir = free_port(), tmp_path / "run"
    service, _ = start_data_service(port, tmp_path / "service.log")
    trainer, lines = _start_reading_trainer(port, workdir)
    seen, restarted = [], None
    try:
        # After the first epoch the trainer has read from the service's job.
        deadline = time.monotonic() + TRAINER_HANG_GUARD_SEC
        while not any("epoch 1:" in line for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
        service.kill()
        service.wait()
        restarted, _ = start_data_service(port, tmp_path / "restarted.log")
        trainer.wait(timeout=TRAINER_HANG_GUARD_SEC)
    except (queue.Empty, subprocess.TimeoutExpired):
        pytest.fail(f"trainer hung: {''.join(seen)[-3000:]}")
    finally:
        trainer.kill()
        trainer.wait()
        service.kill()
        service.wait()
        if restarted is not None:
            stop_seconds(restarted, signal.SIGTERM, tmp_path / "restarted.log")
    while (line := lines.get(timeout=STOP_HANG_GUARD_SEC)) is not None:
        seen.append(line)
    stderr = "".join(seen)
    # Exit status 1, not 2: not the user's input; rerunning resumes.
    assert trainer.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [line for line in seen if line.startswith("effpipe.train:")]
    assert line.startswith(
        f"effpipe.train: error: the tf.data service at --data_service=grpc://localhost:{port} "
        "restarted and lost this run's input jobs"
    ), line


def test_a_trainer_survives_a_restart_of_a_fault_tolerant_dispatcher(tmp_path):
    """SIGKILL of a --role=dispatcher --work_dir service after phase 1's first epoch,
    then a restart on its port with the same --work_dir, while its worker (--role=worker,
    a process of its own) runs on; the trainer finishes its 6 epochs, exit 0.

    The trainer is held (SIGSTOP) from the kill until the restarted dispatcher serves:
    a trainer keeps reading from a live worker while the dispatcher is down, and this
    one would finish its few epochs before the restart is up (measured, with or without
    a --work_dir). Held, it makes all 5 remaining epochs' requests to the restarted
    dispatcher: without a --work_dir, the same steps stop the trainer in one line
    ("restarted and lost this run's input jobs", exit 1) within two epochs.
    """
    port, workdir, journal = free_port(), tmp_path / "run", tmp_path / "journal"
    dispatcher_flags = ["--role=dispatcher", f"--port={port}", f"--work_dir={journal}"]
    # Each service by the name of its log, SIGTERMed at the end.
    services, trainer, seen = {}, None, []
    try:
        services["dispatcher"], ready = start_service(dispatcher_flags, tmp_path / "dispatcher.log")
        assert ready == (
            f"effpipe.data_service: serving at grpc://localhost:{port} (dispatcher only), "
            f"its jobs kept in {journal}\n"
        )
        services["worker"], ready = start_service(
            ["--role=worker", f"--dispatcher=localhost:{port}"], tmp_path / "worker.log"
        )
        assert (
            ready
            == f"effpipe.data_service: 1 worker(s) serving the dispatcher at localhost:{port}\n"
        )
        trainer, lines = _start_reading_trainer(port, workdir)
        # After the first epoch the trainer has read from the dispatcher's job.
        deadline = time.monotonic() + TRAINER_HANG_GUARD_SEC
        while not any("epoch 1:" in line for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
        trainer.send_signal(signal.SIGSTOP)
        killed = services.pop("dispatcher")
        killed.kill()
        killed.wait()
        services["restarted"], _ = start_service(dispatcher_flags, tmp_path / "restarted.log")
        trainer.send_signal(signal.SIGCONT)
        trainer.wait(timeout=TRAINER_HANG_GUARD_SEC)
    except (queue.Empty, subprocess.TimeoutExpired):
        pytest.fail(f"trainer hung: {''.join(seen)[-3000:]}")
    finally:
        if trainer is not None:
            trainer.kill()
            trainer.wait()
        for name, service in services.items():
            stop_seconds(service, signal.SIGTERM, tmp_path / f"{name}.log")
    while (line := lines.get(timeout=STOP_HANG_GUARD_SEC)) is not None:
        seen.append(line)
    stderr = "".join(seen)
    assert trainer.returncode == 0, stderr[-3000:]
    check_run_outputs(workdir, (6, 0))
