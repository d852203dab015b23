"""A decoded cache's folder on disk: images.u8 (row i is image i, size x size x 3 bytes,
no header), progress.jsonl while the first pass runs (a line per batch: positions,
labels, each row's farmhash64 `tf.fingerprint`) and manifest.json, written last (the
decoder, every label, the bad positions, every row's fingerprint).

One process writes a folder, under its flock; others wait for the lock (saying once
who holds it), then find the manifest. The kernel drops a dead writer's lock, so it
never goes stale, and the waiter resumes from the progress log, checking each logged
row against its fingerprint: neither a kill nor a power loss makes it trust a row the
disk lacks, so the pass needs no fsync (a row lost after the manifest fails its check
at the next open). Workers of a multi-worker run
cache their own shards in their own folders (`effpipe.data.sources`): no lock spans
machines.

A complete cache is verified whenever it is opened: its decoder (format, TensorFlow's
version, decode constants) must be this one, and every row must match its fingerprint,
read through the training stream's own read so the pages then serve the first epoch
from memory when they fit. A cache that fails is decoded again after one warning.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

import numpy as np
import tensorflow as tf
from absl import logging

from effpipe import run_dir
from effpipe.data import decode, stores
from effpipe.errors import UsageError, is_disk_full

MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.jsonl"
LOCK_FILE = "lock"
# Bump when what a cache holds changes: a cache of another format is decoded again.
CACHE_FORMAT = 5


def decoder_identity(size: int, crop: str) -> dict:
    """What a cache's pixels depend on beyond its files: a cache written under another
    is decoded again."""
    identity = {"format": CACHE_FORMAT, "tensorflow": tf.__version__, "decode": decode.DECODER}
    return {**identity, "size": size, "crop": crop}


@contextlib.contextmanager
def writer_lock(encoded, directory):
    """Holds the folder's flock, first waiting for a process that holds it (saying who)."""
    with open(os.path.join(directory, LOCK_FILE), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise UsageError(
                    f"cannot lock the decoded cache {directory} ({error.strerror}): put "
                    "--cache_dir on a local disk"
                ) from error
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            message = "%s: waiting for %s, which is writing the decoded cache %s"
            logging.info(message, encoded.name, holder, directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(encoded, directory, size, crop) -> dict | None:
    """The folder's manifest when it is of this decoder, else None (warned once)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    manifest = run_dir.read_json(path)
    if manifest.get("decoder") == decoder_identity(size, crop):
        return manifest
    message = "%s: the decoded cache %s was written by another decoder (%s): decoding again"
    logging.warning(message, encoded.name, directory, manifest.get("decoder"))
    return None


def verified(encoded, directory, size, manifest) -> bool:
    """Whether every row of the cache matches its fingerprint (warns when not)."""
    start, path = time.monotonic(), stores.cache_file(directory)
    length = os.path.getsize(path) if os.path.isfile(path) else -1
    problem = "is cut short" if length != encoded.count * stores.cached_bytes(size) else None
    if not problem:
        found = _row_fingerprints(stores.CacheStore(directory, size, encoded.count))
        changed = found != np.asarray(manifest["fingerprints"], np.uint64)
        changed[manifest["bad"]] = False  # The row of a bad image is never read.
        if changed.any():
            problem = f"has {int(changed.sum())} rows that changed since written"
    if problem:
        logging.warning("%s: the decoded cache %s %s: decoding again", encoded.name, path, problem)
        return False
    seconds = time.monotonic() - start
    logging.info("%s: %d rows verified in %.1f s", encoded.name, encoded.count, seconds)
    return True


def _row_fingerprints(store: stores.CacheStore, positions: np.ndarray | None = None):
    """The farmhash64 fingerprint of each row at `positions` (all by default), read
    as the training stream reads them (`stores.fetch_batch`)."""
    positions = np.arange(store.count) if positions is None else positions
    read, batches = stores.fetch_batch(store), tf.data.Dataset.from_tensor_slices(positions)
    dataset = batches.batch(256).map(lambda rows: tf.fingerprint(read(rows)), num_parallel_calls=-1)
    parts = [batch.view("<u8").ravel() for batch in dataset.as_numpy_iterator()]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


class RowFile:
    """The file of rows while a first pass writes it (in place, in any order), and its
    progress log. On entry a killed pass's log is read back: the rows it names that
    match their fingerprints are `done`, the rest are decoded again."""

    def __init__(self, encoded, directory, size, crop):
        self.encoded, self.directory, self.size, self.crop = encoded, directory, size, crop
        self.path = stores.cache_file(directory)
        self.log_path = os.path.join(directory, PROGRESS_FILE)
        self.done = np.zeros(encoded.count, bool)
        self.labels = np.zeros(encoded.count, np.int32)
        self.fingerprints = np.zeros(encoded.count, np.uint64)

    def __enter__(self):
        total = self.encoded.count * stores.cached_bytes(self.size)
        if os.path.isfile(self.path) and os.path.getsize(self.path) == total:
            self._resume()
        else:
            _allocate_rows(self.directory, self.path, total)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.log_path)
        self.descriptor = os.open(self.path, os.O_RDWR)
        self.log = open(self.log_path, "a")
        return self

    def __exit__(self, *exc_info):
        self.log.close()
        os.close(self.descriptor)

    def _resume(self) -> None:
        if not os.path.isfile(self.log_path):
            return
        with open(self.log_path) as log:
            for line in log:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # A line cut by the kill.
                    break
                positions = np.asarray(entry["positions"], np.int64)
                self.labels[positions] = entry["labels"]
                self.fingerprints[positions] = np.asarray(entry["fingerprints"], np.uint64)
                self.done[positions] = True
        logged = np.flatnonzero(self.done)
        store = stores.CacheStore(self.directory, self.size, self.encoded.count)
        intact = _row_fingerprints(store, logged) == self.fingerprints[logged]
        self.done[logged[~intact]] = False
        count, name = self.encoded.count, self.encoded.name
        message = "%s: resuming the first pass: %d of %d images already in %s"
        logging.info(message, name, int(intact.sum()), count, self.directory)

    def write(self, positions, images, labels, fingerprints) -> None:
        row = stores.cached_bytes(self.size)
        try:
            for position, image in zip(positions.tolist(), images):
                if os.pwrite(self.descriptor, image.data, position * row) != row:
                    raise OSError(errno.ENOSPC, "a write cut short")
        except OSError as error:
            if not is_disk_full(error):
                raise
            kept = (
                "The images written so far are kept, and the rerun resumes the cache; "
                "--cache_dir puts it on another disk, --cache=memory or off keeps it off the disk."
            )
            raise run_dir.disk_full_error(self.path, row, at_least=True, kept=kept) from error
        self.fingerprints[positions] = fingerprints
        entry = {"positions": positions, "labels": labels, "fingerprints": fingerprints}
        self.log.write(json.dumps({key: value.tolist() for key, value in entry.items()}) + "\n")
        self.log.flush()

    def finish(self, labels, bad) -> None:
        """Marks the cache complete: the manifest, then no progress log."""
        write_manifest(self.directory, self.size, self.crop, labels, bad, self.fingerprints)
        os.remove(self.log_path)


def write_manifest(directory, size, crop, labels, bad, fingerprints) -> None:
    manifest = {"decoder": decoder_identity(size, crop), "labels": np.asarray(labels).tolist()}
    manifest["bad"] = [int(position) for position in bad]
    manifest["fingerprints"] = np.asarray(fingerprints, np.uint64).tolist()
    run_dir.write_json(os.path.join(directory, MANIFEST_FILE), manifest)


def _allocate_rows(directory: str, path: str, total_bytes: int) -> None:
    """Allocates the file of rows whole (posix_fallocate), so a disk too small stops
    the pass before any decoding; where that cannot be (a filesystem that cannot
    allocate ahead), a sparse file, and the writes may find the disk full."""
    with open(path, "wb") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, total_bytes)
        except OSError as error:
            if is_disk_full(error):
                file.close()
                os.remove(path)
                kept = (
                    "Nothing was decoded yet; --cache_dir puts the cache on another disk, "
                    "--cache=memory or off keeps it off the disk."
                )
                raise run_dir.disk_full_error(
                    directory, total_bytes, at_least=False, kept=kept
                ) from error
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            file.truncate(total_bytes)
