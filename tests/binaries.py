"""Running effpipe's binaries as a user does, for the tests (a helper, not a test file)."""

import json
import math
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train(*args, timeout_sec=900, env=None):
    """Runs `python -m effpipe.train ARGS` from the repo root, with `env` added to the
    environment."""
    return subprocess.run(
        [sys.executable, "-m", "effpipe.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_sec,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )


def check_run_outputs(workdir, phase_epochs):
    """Checks the files, history and metrics every finished run writes; returns the
    history and the metrics."""
    for name in ("flags.txt", "history.json", "metrics.json", "history.png"):
        assert (workdir / name).is_file(), name
    assert (workdir / "checkpoints" / "best.weights.h5").is_file()
    history = json.loads((workdir / "history.json").read_text())
    assert [len(history["phase1"]), len(history["phase2"])] == list(phase_epochs)
    expected_keys = {
        "epoch", "loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5",
        "seconds", "images_per_sec", "ms_per_step", "steps",
    }  # fmt: skip
    for record in history["phase1"] + history["phase2"]:
        assert expected_keys <= set(record)
        assert record["seconds"] > 0 and record["images_per_sec"] > 0
        assert 0.0 <= record["val_accuracy"] <= 1.0 and math.isfinite(record["loss"])
    epochs = [record["epoch"] for record in history["phase1"] + history["phase2"]]
    assert epochs == list(range(1, sum(phase_epochs) + 1))
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert math.isfinite(metrics["loss"]) and metrics["train_images_per_sec"] > 0
    assert metrics["evaluated_on"] == "test"
    return history, metrics


def check_png(path, min_size=(400, 200)):
    """Checks that `path` is a PNG of at least `min_size` (width, height), not blank."""
    import numpy as np
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(str(path))).numpy()
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    assert np.asarray(image).std() > 5, "the plot is blank"
