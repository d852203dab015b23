"""Starts a tf.data service: a dispatcher and its workers, until interrupted.

    python -m effpipe.data_service --port=5050 --num_workers=4
    python -m effpipe.train ... --data_service=grpc://HOST:5050   # elsewhere

The dispatcher listens on --port; the workers (tf.data.experimental.service
WorkerServer, in this process) run the trainers' input pipelines and serve their
batches over gRPC. More workers take the host pipeline off the training machines;
they can also run on other machines, started with TensorFlow's WorkerServer and
pointed at this dispatcher. Stops on SIGINT or SIGTERM.
"""

import os
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402

from effpipe import cli_flags  # noqa: E402
from effpipe.errors import UsageError  # noqa: E402

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
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    # The line a script (or a test) waits for before starting trainers.
    print(
        f"{PROGRAM}: serving at {dispatcher.target} with {len(workers)} worker(s)",
        flush=True,
    )
    logging.info("pass --data_service=%s to effpipe.train", dispatcher.target)
    stop.wait()
    for worker in workers:
        worker.stop()
    dispatcher.stop()
    sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
