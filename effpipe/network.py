"""Whether a host answers: a TCP connection tried with a deadline.

TensorFlow's data-service clients and servers, and downloads, retry an absent peer
for minutes or for ever (and a step waiting on one does not see SIGTERM); effpipe
asks first, with this, and stops in one line of its own when nothing answers.
"""

import socket


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
