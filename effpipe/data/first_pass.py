"""The first pass: every image of a split read and decoded once, in parallel.

The decodes run in a parallel tf.data map, in any order. An image that does not
decode drops out of the stream; each position missing at the end is read again on
its own: bytes that cannot be read stop the pass in one line (a disk or network error
is not a bad image), bytes that do not decode are a bad image. A read error in the
stream itself (a damaged tfds file) stops the pass at once.
"""

import os
import re
import signal
import time

import numpy as np
import tensorflow as tf
from absl import logging

from effpipe.data import decode as decode_lib
from effpipe.errors import UsageError

# Images per batch from the decoding pipeline to the Python loop (a progress log line each).
PASS_BATCH = 256
# Test hooks: SIGKILL this process once a first pass has decoded this many images, as
# a crash or an impatient user would; hold a pass after each batch while a file exists.
KILL_AFTER_ENV = "EFFPIPE_TEST_KILL_FIRST_PASS_AFTER"
HOLD_ENV = "EFFPIPE_TEST_HOLD_FIRST_PASS_WHILE"
# A pass of a few hundred images ends in seconds: its log lines say enough.
PROGRESS_BAR_IMAGES = 500


class MemorySink:
    """Where a first pass puts rows in memory (or nowhere: a scan for bad images)."""

    def __init__(self, images, count: int):
        self.images, self.done = images, np.zeros(count, bool)
        self.labels = np.zeros(count, np.int32)

    def write(self, positions, images, labels, fingerprints) -> None:
        if self.images is not None:
            self.images[positions] = images


def decode(encoded, size, crop, sink) -> tuple[np.ndarray, list[int]]:
    """Decodes every image the sink (MemorySink, cache_files.RowFile) has not `done`
    and hands them to `sink.write`: (the label of every position, the positions whose
    bytes do not decode)."""
    labels, arrived = sink.labels, sink.done.copy()
    todo = tf.constant(~arrived)
    reads_files = encoded.paths is not None

    def decode_one(position, record):
        key, label = record
        contents = tf.io.read_file(key) if reads_files else key
        image = decode_lib.decode_to_size(contents, size, crop)
        return position, image, tf.cast(label, tf.int32), tf.fingerprint(image[None])[0]

    # Positions travel with the images: one that does not decode drops out and is
    # found missing at the end. Parallel decodes arrive in any order.
    records = encoded.make_records().enumerate().filter(lambda position, _: todo[position])
    if reads_files:
        # A file that cannot be read drops out here too: the read at the end tells.
        dataset = records.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        dataset = dataset.ignore_errors()
    else:
        # tfds reads its files upstream, where ignore_errors would swallow (or spin
        # on) a damaged file: errors are ignored in each record's own decode only.
        dataset = records.interleave(
            lambda *record: tf.data.Dataset.from_tensors(record).map(decode_one).ignore_errors(),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
    progress = _Progress(encoded, int((~arrived).sum()))
    try:
        for batch in dataset.batch(PASS_BATCH).prefetch(2).as_numpy_iterator():
            positions, images, batch_labels, fingerprints = batch
            sink.write(positions, images, batch_labels, fingerprints.view("<u8").ravel())
            arrived[positions], labels[positions] = True, batch_labels
            progress.update(len(positions))
            _test_hooks(progress.count)
    except tf.errors.OpError as error:
        raise UsageError(
            f"cannot read the {encoded.name} images ({_reason(error)}): "
            "a read error, not an image that does not decode; check the files and the "
            "disk, then rerun"
        ) from error
    bad = []
    for position in np.flatnonzero(~arrived).tolist():
        image, labels[position] = _read_again(encoded, position, size, crop)
        if image is None:
            bad.append(position)
            continue
        fingerprint = tf.fingerprint(image[None]).numpy().view("<u8").ravel()
        sink.write(np.asarray([position]), image[None], labels[[position]], fingerprint)
        progress.update(1)
    progress.close()
    return labels, bad


def _reason(error: tf.errors.OpError) -> str:
    """TensorFlow's message of `error` without the names of its ops and functions."""
    message = re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:.*$", "", error.message, flags=re.S)
    message = message.split("}}")[-1]
    return re.sub(r"^.*Iterator::[\w:]+: ", "", message, flags=re.S).strip()


def _test_hooks(decoded: int) -> None:
    """KILL_AFTER_ENV and HOLD_ENV, after a batch is written and logged."""
    if decoded >= int(os.environ.get(KILL_AFTER_ENV) or 2**62):
        os.kill(os.getpid(), signal.SIGKILL)
    while os.path.exists(os.environ.get(HOLD_ENV) or "\0"):
        time.sleep(0.05)


def _read_again(encoded, position: int, size: int, crop: str):
    """Reads and decodes once more, on its own, an image that did not arrive decoded,
    to tell a bad image from a read error: (the image, or None when its bytes do not
    decode; its label).

    Raises:
      UsageError: the bytes cannot be read (a disk failing, a file removed since the
        listing, a damaged tfds file): not a bad image, and not kept as one.
    """
    try:
        if encoded.paths is not None:
            with open(encoded.paths[position], "rb") as file:
                contents, label = file.read(), encoded.labels[position]
        else:
            contents, label = next(iter(encoded.make_records().skip(position).take(1)))
    except (OSError, tf.errors.OpError) as error:
        reason = getattr(error, "strerror", None) or _reason(error)
        raise UsageError(
            f"cannot read {encoded.describe(position)} ({reason}): a read error, not an "
            "image that does not decode; check the file and the disk, then rerun"
        ) from error
    try:
        image = decode_lib.decode_to_size(contents, size, crop).numpy()
    except tf.errors.OpError:
        return None, int(label)
    message = (
        "%s: %s did not decode in the first pass and decoded when read again (a read "
        "error that cleared)"
    )
    logging.warning(message, encoded.name, encoded.describe(position))
    return image, int(label)


class _Progress:
    """The first pass's log lines and, over PROGRESS_BAR_IMAGES, a Keras progress bar."""

    def __init__(self, encoded, total: int):
        import keras

        self.start, self.count, self.total, self.name = time.monotonic(), 0, total, encoded.name
        logging.info("decoding %d %s images (the first pass)", total, encoded.name)
        self.bar = None
        if total >= PROGRESS_BAR_IMAGES:
            self.bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["images/s"])

    def update(self, decoded: int) -> None:
        self.count += decoded
        if self.bar is not None:
            rate = self.count / max(time.monotonic() - self.start, 1e-9)
            self.bar.update(min(self.count, self.total), values=[("images/s", rate)])

    def close(self) -> None:
        seconds = max(time.monotonic() - self.start, 1e-9)
        message = "decoded %d %s images in %.1f s (%.0f images/s)"
        logging.info(message, self.count, self.name, seconds, self.count / seconds)
