"""Starts a tf.data service: a dispatcher and its workers, until interrupted.

    python -m effpipe.data_service --port=5050 --num_workers=4
    python -m effpipe.train ... --data_service=grpc://HOST:5050   # elsewhere

The dispatcher listens on --port; the workers (tf.data.experimental.service
WorkerServer) run the trainers' input pipelines and serve their batches over gRPC.
More workers take the host pipeline off the training machines. --role picks what
this process runs: `all` (the default) the dispatcher and --num_workers workers;
`dispatcher` the dispatcher alone; `worker` --num_workers workers that register
with the dispatcher at --dispatcher=HOST:PORT, on this machine or another:

    python -m effpipe.data_service --role=dispatcher --port=5050 --work_dir=/srv/ds
    python -m effpipe.data_service --role=worker --dispatcher=HOST:5050 --num_workers=4

Each prints one line once it serves. Stops on SIGINT or SIGTERM: exits with status
0 at once, without TensorFlow's server teardown (see `_exit_without_teardown`).

Restarts. With --work_dir the dispatcher runs in TensorFlow's fault_tolerant_mode:
it journals the datasets, jobs and trainers' iterations there before it answers,
and restarted with the same --work_dir (and --port) restores them. That keeps the
jobs only for workers that outlive the dispatcher, i.e. run with --role=worker: a
trainer reads its batches from the workers, trains on while the dispatcher is down,
and goes on with the restored one (tested: SIGKILL of the dispatcher mid-phase,
restart, the trainer ends with status 0). Workers that restart with it cannot serve
a restored job (the trainer would wait for ever), so the `all` role refuses
--work_dir in one line. Without --work_dir a restarted dispatcher
does not know the running jobs: once it is back on the same port, a trainer still
reading gets TensorFlow's "Unknown iteration client id" and stops in one line;
run again with the same command, it resumes.

Trust boundary: TensorFlow's servers listen on every interface (0.0.0.0; they take no
bind address) and run the dataset graphs any client sends; the README says what to
firewall.
"""

import errno
import os
import signal
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging

from effpipe import cli_flags, network, run_dir
from effpipe.errors import UsageError

PROGRAM = "effpipe.data_service"

PORT = flags.DEFINE_integer("port", 5050, "Port of the dispatcher (gRPC).")
NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 1, "Workers started in this process, each on a free port."
)
WORKER_HOST = flags.DEFINE_string(
    "worker_host",
    "localhost",
    "Host name by which trainers reach this machine's workers.",
)
ROLE = flags.DEFINE_enum(
    "role",
    "all",
    ["all", "dispatcher", "worker"],
    "all: a dispatcher and --num_workers workers in this process; dispatcher: the "
    "dispatcher alone; worker: --num_workers workers of the dispatcher at --dispatcher.",
)
WORK_DIR = flags.DEFINE_string(
    "work_dir",
    None,
    "Directory (created when missing) where the dispatcher journals its datasets and jobs "
    "(TensorFlow's fault_tolerant_mode): restarted with the same --work_dir, it restores "
    "them. Keeps jobs over a restart only for workers that outlive it (--role=worker).",
)
DISPATCHER = flags.DEFINE_string(
    "dispatcher",
    None,
    "HOST:PORT of the dispatcher the workers register with (--role=worker).",
)

# How often the main thread looks for a stop request, in seconds. Python runs signal
# handlers in the main thread, between bytecodes; sleeping in short steps, the main
# thread runs the handler within this time wherever the kernel delivered the signal
# (one delivered to another of the process's threads does not wake a main thread
# blocked on a lock, as in Event.wait()).
STOP_POLL_SEC = 0.2


def _exit_without_teardown(signal_number: int) -> None:
    """Exits the process with status 0 now, skipping TensorFlow's server teardown.

    `WorkerServer.stop()` (and `__del__`, which interpreter exit runs) tears down the
    tasks of every job its trainers started, one after another, and can block for
    long or for good. Each task's pipeline joins tf.data's autotuning thread, which
    sleeps up to 60 s between optimizations and can miss the cancellation's wake-up
    (it re-checks the flag before the cancellation sets it). Each task's prefetch
    thread is joined without cancelling the pipeline it waits on; once, a stop had not
    ended after 125 s, that pipeline busy starting new shuffle epochs. Under load,
    stops took up to 57 s after one smoke run. The binding holds the GIL meanwhile, so
    no Python thread can bound the wait. The servers keep nothing a stop would save
    (a dispatcher with --work_dir journals every change before it answers; one without
    keeps nothing): exiting here loses only the goodbye. A trainer still reading waits for the service either way (one still
    waited 90 s after this exit, and 90 s after a completed stop).

    Args:
      signal_number: the signal that asked for the stop, for the log line.
    """
    logging.info("%s: %s: exiting", PROGRAM, signal.Signals(signal_number).name)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _port_in_use_error(port: int) -> UsageError:
    return UsageError(
        f"--port={port} is in use: pass another --port, or stop the process holding it "
        f"(ss -ltnp 'sport = :{port}' names it)"
    )


def check_port_free(port: int) -> None:
    """Raises `UsageError` when something listens on `port`, before TensorFlow starts.

    TensorFlow's servers bind 0.0.0.0:PORT; so does this check. SO_REUSEADDR, as gRPC
    sets it: a port whose last server died leaves connections in TIME_WAIT for a
    minute, which must not stop a restart, while on Linux a listening socket still
    refuses the bind (gRPC's SO_REUSEPORT does not apply: this socket lacks it).

    Args:
      port: the dispatcher's port.

    Raises:
      UsageError: the port is in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_in_use_error(port) from None
            raise UsageError(f"--port={port} cannot be bound: {error.strerror}") from None


# How long the worker role waits for its dispatcher to accept a connection before it
# stops: TensorFlow's WorkerServer would retry its registration for ever.
DISPATCHER_TIMEOUT_SEC = 10.0


def check_flags() -> None:
    """Raises `UsageError` for a value out of range or a flag the --role does not take."""
    if not 1 <= PORT.value <= 65535 or NUM_WORKERS.value < 1:
        raise UsageError(
            f"--port={PORT.value} must be 1..65535 and --num_workers={NUM_WORKERS.value} at least 1"
        )
    role = ROLE.value
    if role == "worker":
        if DISPATCHER.value is None:
            raise UsageError(
                "--role=worker needs --dispatcher=HOST:PORT, a dispatcher started with "
                "--role=dispatcher"
            )
        for name in ("port", "work_dir"):
            if flags.FLAGS[name].present:
                raise UsageError(
                    f"--{name} is the dispatcher's: --role=worker takes --dispatcher=HOST:PORT"
                )
        dispatcher_host_port(DISPATCHER.value)
        return
    if DISPATCHER.value is not None:
        raise UsageError(
            f"--dispatcher is for --role=worker: --role={role} starts its own dispatcher on --port"
        )
    if role == "all" and WORK_DIR.value:
        # Measured with TensorFlow 2.21: the restored job waits for the workers that
        # died with this process, and a trainer then waits for ever; without
        # --work_dir it stops in one line.
        raise UsageError(
            f"--work_dir={WORK_DIR.value} needs workers that outlive the dispatcher: run "
            "--role=dispatcher --work_dir=DIR, and the workers with --role=worker "
            f"--dispatcher=HOST:{PORT.value} (--role=all restarts its workers with it, and "
            "a restored job then never serves again)"
        )
    if role == "dispatcher":
        for name in ("num_workers", "worker_host"):
            if flags.FLAGS[name].present:
                raise UsageError(
                    f"--{name} is the workers': --role=dispatcher starts none (start them "
                    f"with --role=worker --dispatcher=HOST:{PORT.value})"
                )


def dispatcher_host_port(address: str) -> tuple[str, int]:
    """(HOST, PORT) of a --dispatcher value, HOST:PORT or grpc://HOST:PORT.

    Raises:
      UsageError: the value is not of that form.
    """
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--dispatcher={address} must be HOST:PORT with PORT 1..65535")
    return host, int(port)


def check_dispatcher_answers(address: str, timeout_sec: float = DISPATCHER_TIMEOUT_SEC) -> None:
    """Raises `UsageError` unless the dispatcher at `address` accepts a connection.

    A WorkerServer whose dispatcher does not answer retries its registration for ever,
    in a call during which this process does not see SIGTERM; so the worker role asks
    first. Once registered, a worker keeps serving while its dispatcher restarts.

    Args:
      address: --dispatcher, HOST:PORT.
      timeout_sec: how long to wait for the connection.

    Raises:
      UsageError: nothing accepts connections there within `timeout_sec`.
    """
    host, port = dispatcher_host_port(address)
    reason = network.connection_error(host, port, timeout_sec)
    if reason is None:
        return
    raise UsageError(
        f"--dispatcher={address} does not answer ({reason} within {timeout_sec:g} s): start "
        f"`python -m {PROGRAM} --role=dispatcher --port={port}` on that host first, or "
        "check the address and the firewall between here and there"
    )


def make_work_dir(path: str) -> str:
    """Creates --work_dir (and its parents) when missing and returns its absolute path.

    Raises:
      UsageError: it cannot be created (a file in its place or on its path, no
        permission, a read-only filesystem), or is not writable.
    """
    run_dir.make_directory(path, "work_dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(
            f"--work_dir={path} is not writable: pick a directory path you can write to"
        )
    return os.path.abspath(path)


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    role = ROLE.value
    # Before TensorFlow starts: its messages would come before the one line, and it
    # reports a taken port only as "Could not start gRPC server".
    work_dir = None
    try:
        check_flags()
        if role == "worker":
            check_dispatcher_answers(DISPATCHER.value)
        else:
            check_port_free(PORT.value)
            if WORK_DIR.value is not None:
                work_dir = make_work_dir(WORK_DIR.value)
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    # Set before TensorFlow starts: a signal from then on is a stop request. The
    # handler only appends to a list (no lock it could deadlock on, as Event.set
    # can when it interrupts the main thread inside Event.wait).
    stop_requests = []
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda signal_number, _: stop_requests.append(signal_number))
    import tensorflow as tf

    service = tf.data.experimental.service
    if role == "worker":
        host, port = dispatcher_host_port(DISPATCHER.value)
        dispatcher_address = f"{host}:{port}"
    else:
        try:
            dispatcher = service.DispatchServer(
                service.DispatcherConfig(
                    port=PORT.value, work_dir=work_dir, fault_tolerant_mode=work_dir is not None
                )
            )
        except RuntimeError as error:
            # Another server took the port since the check.
            if "Could not start gRPC server" not in str(error):
                raise
            cli_flags.exit_with_usage_error(PROGRAM, _port_in_use_error(PORT.value))
        dispatcher_address = dispatcher.target.removeprefix("grpc://")
    workers = [
        service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=dispatcher_address,
                worker_address=f"{WORKER_HOST.value}:%port%",
            )
        )
        for _ in range(NUM_WORKERS.value if role != "dispatcher" else 0)
    ]
    # The line a script (or a test) waits for before starting trainers.
    if role == "worker":
        ready = f"{len(workers)} worker(s) serving the dispatcher at {dispatcher_address}"
    else:
        ready = f"serving at {dispatcher.target}"
        ready += " (dispatcher only)" if role == "dispatcher" else f" with {len(workers)} worker(s)"
        if work_dir is not None:
            ready += f", its jobs kept in {work_dir}"
    print(f"{PROGRAM}: {ready}", flush=True)
    if role != "worker":
        logging.info("pass --data_service=%s to effpipe.train", dispatcher.target)
    if role == "dispatcher":
        logging.info("start its workers with --role=worker --dispatcher=%s", dispatcher_address)
    while not stop_requests:
        time.sleep(STOP_POLL_SEC)
    _exit_without_teardown(stop_requests[0])


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
