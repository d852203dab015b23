"""Starts a tf.data service: a dispatcher and its workers, until interrupted.

    python -m effpipe.data_service --port=5050 --num_workers=4
    python -m effpipe.train ... --data_service=grpc://HOST:5050   # elsewhere

The dispatcher listens on --port; the workers (tf.data.experimental.service
WorkerServer, in this process) run the trainers' input pipelines and serve their
batches over gRPC. More workers take the host pipeline off the training machines;
they can also run on other machines, started with TensorFlow's WorkerServer and
pointed at this dispatcher. Stops on SIGINT or SIGTERM: exits with status 0 at once,
without TensorFlow's server teardown (see `_exit_without_teardown`).
"""

import os
import signal
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
    # Set before TensorFlow starts: a signal from then on is a stop request. The
    # handler only appends to a list (no lock it could deadlock on, as Event.set
    # can when it interrupts the main thread inside Event.wait).
    stop_requests = []
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda signal_number, _: stop_requests.append(signal_number))
    import tensorflow as tf

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=PORT.value))
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
