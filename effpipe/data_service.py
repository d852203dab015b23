"""Starts a tf.data service: a dispatcher and its workers, until interrupted.

    python -m effpipe.data_service --port=5050 --num_workers=4
    python -m effpipe.train ... --data_service=grpc://HOST:5050   # elsewhere

The dispatcher listens on --port; the workers (tf.data.experimental.service
WorkerServer, in this process) run the trainers' input pipelines and serve their
batches over gRPC. More workers take the host pipeline off the training machines;
they can also run on other machines, started with TensorFlow's WorkerServer and
pointed at this dispatcher. Stops on SIGINT or SIGTERM: exits with status 0 at once,
without TensorFlow's server teardown (see `_exit_without_teardown`).

A restarted service does not keep the jobs of running trainers: its dispatcher holds
them in memory. Once it is back on the same port, a trainer that still reads from it
gets TensorFlow's "Unknown iteration client id" at its next step and stops; run
again with the same command, it resumes. TensorFlow's `fault_tolerant_mode` with a `work_dir` is
not offered: it restores the jobs, but the workers restart with this process, and a
restored job with a restarted worker never serves again (the trainer waits for ever).

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

from effpipe import cli_flags
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
    (the dispatcher is not fault tolerant and has no work_dir): exiting here loses only
    the goodbye. A trainer still reading waits for the service either way (one still
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


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    if not 1 <= PORT.value <= 65535 or NUM_WORKERS.value < 1:
        cli_flags.exit_with_usage_error(
            PROGRAM,
            UsageError(
                f"--port={PORT.value} must be 1..65535 and --num_workers={NUM_WORKERS.value} "
                "at least 1"
            ),
        )
    # Before TensorFlow starts: its messages would come before the one line, and it
    # reports a taken port only as "Could not start gRPC server".
    try:
        check_port_free(PORT.value)
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
    try:
        dispatcher = service.DispatchServer(service.DispatcherConfig(port=PORT.value))
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
        for _ in range(NUM_WORKERS.value)
    ]
    # The line a script (or a test) waits for before starting trainers.
    print(
        f"{PROGRAM}: serving at {dispatcher.target} with {len(workers)} worker(s)",
        flush=True,
    )
    logging.info("pass --data_service=%s to effpipe.train", dispatcher.target)
    while not stop_requests:
        time.sleep(STOP_POLL_SEC)
    _exit_without_teardown(stop_requests[0])


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
