"""Running effpipe's binaries as a user does, for the tests (a helper, not a test file)."""

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train(*args, timeout_sec=900):
    """Runs `python -m effpipe.train ARGS` from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "effpipe.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_sec,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
