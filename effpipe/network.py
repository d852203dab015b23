"""Whether a host answers: a TCP connection tried with a deadline.

TensorFlow's data-service clients and servers, and downloads, retry an absent peer
for minutes or for ever (and a step waiting on one does not see SIGTERM); effpipe
asks first, with this, and stops in one line of its own when nothing answers; and it
says in one line when a tf.data service's dispatcher restarted without its jobs.
"""

import socket

from effpipe.errors import UsageError


def connection_error(host: str, port: int, timeout_sec: float) -> str | None:
    """None when something at HOST:PORT accepts a TCP connection within
    `timeout_sec`; otherwise why not, in a few words ("Connection refused",
    "timeout")."""
    try:
        # Brackets of an IPv6 literal ("[::1]") are the address's, not the host's.
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_sec):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


# How long the trainer waits for a tf.data service's dispatcher to accept a
# connection before it stops: TensorFlow's client would wait for it for ever.
DISPATCHER_TIMEOUT_SEC = 10.0


def check_dispatcher_answers(address: str, timeout_sec: float = DISPATCHER_TIMEOUT_SEC) -> None:
    """Stops in one line unless the dispatcher at `address` accepts a connection.

    TensorFlow's data-service client retries an absent dispatcher without end, and a
    step waiting on it does not end on SIGTERM either; so a trainer asks first.

    Args:
      address: grpc://HOST:PORT of the dispatcher.
      timeout_sec: how long to wait for the connection.

    Raises:
      UsageError: nothing accepts connections there within `timeout_sec`.
    """
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    reason = connection_error(host, int(port), timeout_sec)
    if reason is None:
        return
    raise UsageError(
        f"--data_service={address} does not answer ({reason} within {timeout_sec:g} s): start "
        "`python -m effpipe.data_service --port=PORT` on that host, or check the address "
        "and the firewall between here and there"
    )


# How TensorFlow's data-service client reports a dispatcher that restarted without
# its jobs (a NotFoundError at the next step, once the new dispatcher answers).
DISPATCHER_RESTART_MARKER = "Unknown iteration client id"


def dispatcher_restart_message(address: str, error: Exception) -> str | None:
    """The one line for a training step that failed because its dispatcher restarted.

    A dispatcher without a journal (effpipe.data_service without --work_dir) keeps a
    run's jobs in memory only: a restarted one no longer knows them, and the run
    cannot continue in this process. One with --work_dir restores them, and the
    trainer goes on without an error.

    Args:
      address: grpc://HOST:PORT of the dispatcher (--data_service).
      error: what the training step raised.

    Returns:
      The message, without the resume advice; None for any other error.
    """
    if type(error).__name__ != "NotFoundError" or DISPATCHER_RESTART_MARKER not in str(error):
        return None
    return (
        f"the tf.data service at --data_service={address} restarted and lost this run's input jobs"
    )
