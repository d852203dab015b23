"""The decoded cache: every image of a split decoded once, kept in memory or on disk.

    encoded split (files, tfds records) -> parallel read + decode to --source_size
    -> memory (an array) | disk (one file of rows, under --cache_dir) -> a Split

The first pass decodes in a parallel tf.data map and shows a progress
bar with images/s and the ETA. A file that cannot be decoded (truncated, empty, not
an image) drops out of the stream; its position is missing at the end, so it is named
(--on_bad_image=fail) or skipped and counted (--on_bad_image=skip) without a
traceback and without losing the other images.

On disk a cache is a folder named after a fingerprint of what the images depend on
(the file list with sizes and modification times, or the tfds dataset's files; the
storage size; the crop), so a second run on the same data decodes nothing and a
change of any file makes a new cache. It holds one file of rows (`stores.CACHE_FILE`,
its whole size allocated before any decoding) and `manifest.json`, written last and
atomically, which marks the cache complete.

The first pass decodes a split's images in chunks of consecutive positions
(`CHUNK_IMAGES`): a folder's files, or a tfds split's records read by ranges (one
chunk where the split's file lengths are unknown, as under tfds.testing.mock_data). Each chunk has an flock, a log of the
positions whose rows are on the disk whole (appended by a background thread after
each fdatasync of the rows, so that neither a kill nor a power loss leaves it naming
a row the disk lacks) and, once complete, a file of its labels and bad positions.
Every process given the folder (the workers of a run sharing --cache_dir, runs side
by side) claims, round by round, a share of the chunks nobody holds and decodes
them, then waits for the others' and decodes any whose holder died: the split is
decoded once, shared between them (`_decode_chunks`). The kernel releases an flock
when its process ends, even by SIGKILL, so no lock goes stale; a killed pass is
resumed from the chunks' logs. A complete cache whose file of rows is no longer
whole is decoded again. Where a shared filesystem's locks hold on one machine only,
a process that finds the file allocated again by another (`ALLOCATION_FILE`) does
not mark the cache complete. A full disk stops the pass in one line (the space the
cache needs, the space free), before decoding when the allocation fails; it is never
taken for images that do not decode, and neither is a file that cannot be read
(each file that did not decode is read again: one that decodes then, after a read
error that cleared, is kept as any other image).
"""

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from effpipe import run_dir
from effpipe.data import decode, stores
from effpipe.data.splits import Split
from effpipe.errors import UsageError, is_disk_full

MANIFEST_FILE = "manifest.json"
# Held (flock) by the process writing a cache; empty.
LOCK_FILE = "lock"
# Who allocated the file of rows (host, PID, a random token), written once it is
# allocated: a first pass starts by it, and a different token there at the end means
# another process allocated the file again meanwhile, which the lock should have
# prevented (a shared filesystem whose locks hold on one machine only).
ALLOCATION_FILE = "allocation"
# A first pass decodes its split in chunks of consecutive positions, which processes
# sharing the cache's folder claim one at a time (each chunk has a lock, a log of its
# positions written and, once complete, a file of its labels and bad positions).
CHUNK_PREFIX = "chunk-"
# Images per chunk, at least; a split has at most MAX_CHUNKS chunks.
CHUNK_IMAGES = 1024
MAX_CHUNKS = 1024
# Chunks one pipeline decodes at most (each holds two descriptors while it does).
MAX_CLAIM = 64
# Bump when what a cache holds changes: older caches are then not reused.
CACHE_FORMAT = 4
# Images per batch handed from the decoding pipeline to the Python loop (a progress
# update each, about twice a second).
PASS_BATCH = 256
# Fault injection for the tests: SIGKILL this process once a first pass has decoded
# this many images, as a crash or an impatient user would.
KILL_AFTER_ENV = "EFFPIPE_TEST_KILL_FIRST_PASS_AFTER"
# First passes over fewer images show no progress bar.
PROGRESS_BAR_IMAGES = 500


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """The encoded images of one split, in a fixed order: what the first pass decodes.

    Attributes:
      name: "train", "test" or "validation", for logs and the cache folder.
      count: number of images.
      fingerprint: digest of what the images are (file list, sizes, times).
      make_records: () -> dataset of (key, label) in position order; a key is a path
        to read (`reads_files`) or the encoded bytes themselves.
      reads_files: whether keys are paths.
      describe: position -> how to name that image in a message (its path).
      paths: the files (folders), so --cache=off can decode them on every pass.
      stream: (size, crop, skip_bad) -> the records as a `stores.RecordStore` (tfds),
        so --cache=off can decode them on every pass.
      read_range: (start, stop) -> the records of positions start..stop-1, as
        `make_records` yields them (tfds with its split's file lengths), so the first
        pass decodes the split in chunks.
    """

    name: str
    count: int
    fingerprint: str
    make_records: Callable[[], tf.data.Dataset]
    reads_files: bool
    describe: Callable[[int], str]
    paths: tuple[str, ...] | None = None
    stream: Callable[[int, str, bool], stores.RecordStore] | None = None
    read_range: Callable[[int, int], tf.data.Dataset] | None = None


def materialize(
    encoded: EncodedSplit,
    *,
    size: int,
    crop: str,
    mode: str,
    cache_root: str,
    memory_budget_mb: int,
    on_bad_image: str,
    labels: np.ndarray | None = None,
    workers: tuple[int, int] = (1, 0),
) -> tuple[Split, tuple[str, ...]]:
    """Decodes a split once into memory or the disk cache, or reuses the disk cache.

    Args:
      encoded: the split's encoded images.
      size: side in pixels images are stored at.
      crop: "resize" or "centre" (effpipe.data.decode).
      mode: "auto", "memory", "disk" or "off" (decode on every pass).
      cache_root: the folder that holds disk caches.
      memory_budget_mb: with "auto", the largest decoded split kept in memory.
      on_bad_image: "fail" or "skip".
      labels: the labels when known before decoding (folders).
      workers: (count, index) of the processes expected to share a disk cache's
        first pass (the workers of a run): each first claims a 1/count share.

    Returns:
      (the split over its store, the names of skipped images).

    Raises:
      UsageError: a bad image with "fail", no image that decodes, or "off" for a
        source that has no files to re-read.
    """
    count, index = workers
    if not 0 <= index < count:
        raise ValueError(f"workers must be (count, index) with 0 <= index < count: {workers}")
    decoded_mb = encoded.count * size * size * 3 / 2**20
    if mode == "off":
        return _uncached(encoded, size, crop, cache_root, on_bad_image, labels, decoded_mb)
    if mode == "auto":
        mode = "memory" if decoded_mb <= memory_budget_mb else "disk"
    if mode == "memory":
        images = np.empty((encoded.count, size, size, 3), np.uint8)
        pass_labels, bad = _first_pass(encoded, size, crop, images=images, labels=labels)
        store = stores.ArrayStore(images)
    else:
        directory = os.path.join(cache_root, _folder_name(encoded, size, crop))
        pass_labels, bad = _disk_cache(encoded, size, crop, directory, labels, workers)
        store = stores.CacheStore(directory, size, encoded.count)
    return _finish(encoded, store, pass_labels, bad, on_bad_image, decoded_mb, mode)


def _uncached(encoded, size, crop, cache_root, on_bad_image, labels, decoded_mb):
    """--cache=off: the split over its files (folders) or records (tfds), decoded on
    every pass. With --on_bad_image=skip the split is decoded once first to find the
    images that do not decode (`_scan`): they are left out of the split and counted as
    the cached modes count them, so a run's splits and its metrics do not depend on
    --cache."""
    skip_bad = on_bad_image == "skip"
    if encoded.paths is not None:
        store = stores.FileStore(encoded.paths, size, crop, skip_bad=skip_bad)
    elif encoded.stream is None:
        raise UsageError(
            f"--cache=off streams a dataset's files on every pass, and the {encoded.name} "
            "split lists none (a dataset under tfds.testing.mock_data): use --cache=auto, "
            "memory or disk"
        )
    else:
        store = encoded.stream(size, crop, skip_bad)
    if skip_bad:
        scan_labels, bad = _scan(encoded, size, crop, cache_root, labels)
        labels = scan_labels if labels is None else labels
        return _finish(encoded, store, labels, bad, on_bad_image, decoded_mb, "off")
    if labels is None:
        labels = _stream_labels(encoded, store, cache_root)
    return Split(store, labels), ()


def _scan(encoded, size, crop, cache_root, labels=None):
    """(labels, positions that do not decode) of a split, from one decoding pass that
    keeps nothing; kept in a small file under `cache_root`, so later runs on the same
    files do not decode them again."""
    key = f"{CACHE_FORMAT}\0{encoded.fingerprint}\0{encoded.count}"
    path = os.path.join(
        cache_root, f"{encoded.name}-scan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    )
    if os.path.isfile(path):
        with open(path) as file:
            scanned = json.load(file)
        if len(scanned["labels"]) == encoded.count:
            return np.asarray(scanned["labels"], np.int32), scanned["bad"]
    logging.info(
        "%s: decoding every image once to find those that do not decode "
        "(--cache=off with --on_bad_image=skip)",
        encoded.name,
    )
    labels, bad = _first_pass(encoded, size, crop, labels=labels)

    def write(temporary):
        with open(temporary, "w") as file:
            json.dump({"labels": labels.tolist(), "bad": bad}, file)

    run_dir.write_atomically(path, write)
    return labels, bad


def _stream_labels(encoded: EncodedSplit, store: stores.RecordStore, cache_root: str) -> np.ndarray:
    """The labels of a streamed split in position order: read once (every record, no
    image decoded) and kept in a small file under `cache_root` for later runs."""
    key = f"{CACHE_FORMAT}\0{encoded.fingerprint}\0{encoded.count}"
    path = os.path.join(
        cache_root, f"{encoded.name}-labels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    )
    if os.path.isfile(path):
        labels = np.load(path)
        if labels.shape == (encoded.count,):
            return labels
    logging.info("%s: reading the labels of %d records (once)", encoded.name, encoded.count)
    start = time.monotonic()
    labels = np.full(encoded.count, -1, np.int32)
    records = store.read(None, (1, 0)).map(lambda position, image, label: (position, label))
    for positions, batch_labels in records.batch(4096).as_numpy_iterator():
        labels[positions] = batch_labels
    if (labels < 0).any():
        raise UsageError(
            f"the {encoded.name} split lists {encoded.count} records but "
            f"{int((labels >= 0).sum())} were read: prepare the dataset again"
        )
    # The temporary's name ends in .npy too, so np.save keeps it.
    run_dir.write_atomically(path, lambda temporary: np.save(temporary, labels))
    logging.info(
        "%s: labels read in %.1f s, kept in %s", encoded.name, time.monotonic() - start, path
    )
    return labels


def _finish(encoded, store, labels, bad, on_bad_image, decoded_mb, mode):
    skipped = tuple(encoded.describe(position) for position in bad)
    if skipped and on_bad_image != "skip":
        raise UsageError(
            f"cannot decode image {skipped[0]}: delete or replace the file, or pass "
            "--on_bad_image=skip"
        )
    kept = np.setdiff1d(np.arange(encoded.count), np.asarray(bad, dtype=np.int64))
    if not len(kept):
        raise UsageError(f"no image of the {encoded.name} split can be decoded: replace the files")
    if skipped:
        logging.warning(
            "skipped %d of %d %s images that cannot be decoded (--on_bad_image=skip), first %s",
            len(skipped),
            encoded.count,
            encoded.name,
            ", ".join(skipped[:3]),
        )
    if mode == "off":
        logging.info("%s: %d images, decoded on every pass (--cache=off)", encoded.name, len(kept))
    else:
        logging.info(
            "%s: %d images, %.0f MB decoded, cached in %s",
            encoded.name,
            len(kept),
            decoded_mb,
            mode if mode == "memory" else store.directory,
        )
    return Split(store, np.asarray(labels)[kept], kept.astype(np.int64)), skipped


def _folder_name(encoded: EncodedSplit, size: int, crop: str) -> str:
    # The chunks' layout is in the key: a cache of other chunks is another folder
    # (records read by ranges were one chunk before; folders' keys are unchanged).
    ranges = "\0ranges" if encoded.paths is None and encoded.read_range is not None else ""
    key = (
        f"{CACHE_FORMAT}\0{encoded.fingerprint}\0{size}\0{crop}\0{encoded.count}"
        f"\0{CHUNK_IMAGES}\0{MAX_CHUNKS}{ranges}"
    )
    return f"{encoded.name}-{size}px-{crop}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _disk_cache(encoded, size, crop, directory, labels, workers=(1, 0)):
    """(labels, bad positions) of a complete disk cache, built or resumed here first.

    Every process given this folder takes part: each claims the chunks nobody holds,
    decodes them, then waits for the chunks others hold (decoding any whose holder
    died), so workers or runs sharing a --cache_dir decode the split once, between
    them.
    """
    complete = _complete_cache(encoded, size, directory)
    if complete is not None:
        return complete
    os.makedirs(directory, exist_ok=True)
    with _folder_lock(encoded, directory):
        complete = _complete_cache(encoded, size, directory)
        if complete is not None:
            return complete
        token = _allocated(encoded, size, directory)
    chunks = _chunks(encoded.count, _chunked(encoded, labels))
    _decode_chunks(encoded, size, crop, directory, labels, chunks, workers, tag=_tag(token))
    with _folder_lock(encoded, directory):
        complete = _complete_cache(encoded, size, directory)
        if complete is not None:
            return complete
        try:
            with open(os.path.join(directory, ALLOCATION_FILE)) as file:
                other = file.read()
            if other == token:
                return _write_manifest(encoded, size, crop, directory, chunks, _tag(token))
            holder = other.rsplit(" ", 1)[0]
        except FileNotFoundError:  # Removed by a process allocating the file again.
            holder = "on another host"
        raise UsageError(
            f"another process ({holder}) started the decoded cache "
            f"{directory} again while this one ({token.rsplit(' ', 1)[0]}) wrote it: the "
            "cache's lock holds on one machine only on this filesystem. Rerun when that "
            "process has finished (it completes the cache), or give each machine its own "
            "--cache_dir"
        )


def _complete_cache(encoded, size, directory):
    """(labels, bad positions) of the cache in `directory` when it is complete: its
    manifest says so and its file of rows is still whole."""
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    rows = stores.cache_file(directory)
    if not os.path.isfile(manifest_path) or not os.path.isfile(rows):
        return None
    if os.path.getsize(rows) != encoded.count * stores.cached_bytes(size):
        logging.warning("%s: the decoded cache %s is cut short: decoding again", encoded.name, rows)
        with contextlib.suppress(FileNotFoundError):  # Another process's check removed it.
            os.remove(manifest_path)
        return None
    with open(manifest_path) as file:
        manifest = json.load(file)
    if manifest.get("format") != CACHE_FORMAT or len(manifest["labels"]) != encoded.count:
        return None
    logging.info("%s: reusing the decoded cache %s", encoded.name, directory)
    return np.asarray(manifest["labels"], np.int32), manifest["bad"]


@contextlib.contextmanager
def _folder_lock(encoded, directory):
    """Holds the cache folder's lock: for allocating its file and for its manifest.

    An flock on LOCK_FILE, which the kernel releases when its process ends, however
    it ends: it cannot go stale.
    """
    with _flock(encoded, directory, LOCK_FILE, block=True) as held:
        yield held


@contextlib.contextmanager
def _flock(encoded, directory, name, *, block):
    """An flock on the file `name` of the cache folder: yields whether it is held
    (always, when `block`)."""
    with open(os.path.join(directory, name), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                # A filesystem without locks (some NFS and Lustre mounts).
                logging.log_first_n(
                    logging.WARNING,
                    "%s: cannot lock the decoded cache %s (%s): do not start two runs "
                    "with this --cache_dir at once",
                    1,
                    encoded.name,
                    directory,
                    error.strerror,
                )
                yield True
                return
            if not block:
                yield False
                return
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _allocated(encoded, size, directory) -> str:
    """The token of the allocation of the cache's file of rows, which this process
    makes when there is none or the file is not whole (nothing of an earlier pass is
    kept then)."""
    token_path = os.path.join(directory, ALLOCATION_FILE)
    rows = stores.cache_file(directory)
    total = encoded.count * stores.cached_bytes(size)
    if os.path.isfile(token_path) and os.path.isfile(rows) and os.path.getsize(rows) == total:
        with open(token_path) as file:
            return file.read()
    if os.path.exists(token_path):
        os.remove(token_path)
    for name in os.listdir(directory):
        if name.startswith(CHUNK_PREFIX) and not name.endswith(".lock"):
            os.remove(os.path.join(directory, name))
    _allocate_rows(directory, rows, total)
    token = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex}"
    run_dir.write_atomically(token_path, lambda path: _write_text(path, token))
    _sync_folder(directory)
    return token


def _allocate_rows(directory: str, rows: str, total_bytes: int) -> None:
    """Allocates the file of rows whole (posix_fallocate), so a disk too small stops
    the pass before any decoding; where that cannot be (a filesystem that cannot
    allocate ahead), a sparse file, and the writes may find the disk full."""
    descriptor = os.open(rows, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(descriptor, 0)
        try:
            os.posix_fallocate(descriptor, 0, total_bytes)
        except OSError as error:
            if is_disk_full(error):
                os.close(descriptor)
                descriptor = -1
                os.remove(rows)
                raise run_dir.disk_full_error(
                    directory,
                    total_bytes,
                    at_least=False,
                    kept="Nothing was decoded yet; --cache_dir puts the cache on another disk, "
                    "--cache=memory or off keeps it off the disk.",
                ) from error
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(descriptor, total_bytes)
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def _chunked(encoded: EncodedSplit, labels) -> bool:
    """Whether the split's images can be decoded from any position on: files whose
    labels are known before decoding (a folder), or records read by ranges (tfds);
    else records read in order from the first (tfds under mock_data)."""
    return (encoded.paths is not None and labels is not None) or encoded.read_range is not None


def _chunks(count: int, chunked: bool) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of a split of `count` images; one chunk when the
    split's records can only be read from the first."""
    if not chunked:
        return [(0, count)]
    size = max(CHUNK_IMAGES, -(-count // MAX_CHUNKS))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _tag(token: str) -> str:
    """The mark of one allocation of the file of rows in its chunks' file names."""
    return token.rsplit(" ", 1)[-1][:12]


def _chunk_file(directory: str, index: int, suffix: str, tag: str = "") -> str:
    """A file of chunk `index`: its lock (no `tag`), or its log or file of labels,
    which name the allocation they belong to (`tag`): a process never takes the
    chunks written into another allocation of the file for its own, even where the
    folder's lock did not keep the two apart."""
    return os.path.join(directory, f"{CHUNK_PREFIX}{index:03d}{'.' + tag if tag else ''}{suffix}")


def _decode_chunks(encoded, size, crop, directory, labels, chunks, workers=(1, 0), *, tag):
    """Decodes the chunks of the split that no process has completed.

    In rounds: each round claims, from this worker's place in the order on, up to
    1/`workers[0]` of the chunks not complete that nobody holds (MAX_CLAIM at most),
    and decodes them in one pipeline (a pipeline per chunk would pay its start and end
    for each); then, once their holders let go, any chunk another process held and
    did not complete. Workers started together thus take one share each, and a worker
    that finishes early takes part of what is left.
    """
    if not chunks:
        return
    # The images of each chunk the progress bar has counted.
    counted = [
        stop - start
        if _chunk_complete(directory, k, tag)
        else len(_logged(directory, k, start, stop, tag))
        for k, (start, stop) in enumerate(chunks)
    ]
    if sum(counted):
        logging.info(
            "%s: resuming the decoded cache %s, %d of %d images already written",
            encoded.name,
            directory,
            sum(counted),
            encoded.count,
        )
    # The bar counts what is left: its rate and ETA are those of this pass (with the
    # chunks other processes complete meanwhile), not of the images written before.
    progress = _Progress(encoded, encoded.count - sum(counted))

    def decode(claimed):
        for k, todo, _ in claimed:
            # Rows logged since the count above (a process that ended midway); the
            # images decoded here are counted as they arrive.
            start, stop = chunks[k]
            progress.elsewhere(max(stop - start - len(todo) - counted[k], 0))
            counted[k] = stop - start
        _decode_claimed(encoded, size, crop, directory, labels, chunks, claimed, progress, tag=tag)

    count, index = workers
    first = index * len(chunks) // count
    order = list(range(first, len(chunks))) + list(range(first))
    held_elsewhere = []
    while True:
        left = [k for k in order if not _chunk_complete(directory, k, tag)]
        most = min(-(-len(left) // count), MAX_CLAIM)
        claimed, held_elsewhere = _claim(encoded, directory, chunks, left, most, tag=tag)
        if not claimed:
            break
        decode(claimed)
    if held_elsewhere:
        logging.info(
            "%s: waiting for %d chunks of the decoded cache %s that other processes decode",
            encoded.name,
            len(held_elsewhere),
            directory,
        )
    for k in held_elsewhere:
        claimed, _ = _claim(encoded, directory, chunks, [k], 1, block=True, tag=tag)
        if claimed:  # Its holder ended before completing it.
            decode(claimed)
        else:  # Another process decoded it.
            start, stop = chunks[k]
            progress.elsewhere(max(stop - start - counted[k], 0))
            counted[k] = stop - start
    progress.close()


def _chunk_complete(directory: str, k: int, tag: str) -> bool:
    return os.path.isfile(_chunk_file(directory, k, ".json", tag))


def _claim(encoded, directory, chunks, candidates, most, *, block=False, tag):
    """Locks up to `most` chunks of `candidates` that are not complete.

    Returns:
      ([(chunk, positions left to decode in it, its lock)], the candidates that
      another process held).
    """
    claimed, held_elsewhere = [], []
    try:
        for k in candidates:
            if len(claimed) == most:
                break
            with contextlib.ExitStack() as lock:
                name = os.path.basename(_chunk_file(directory, k, ".lock"))
                if not lock.enter_context(_flock(encoded, directory, name, block=block)):
                    held_elsewhere.append(k)
                    continue
                if _chunk_complete(directory, k, tag):
                    continue
                start, stop = chunks[k]
                logged = _logged(directory, k, start, stop, tag)
                todo = np.setdiff1d(np.arange(start, stop), logged)
                claimed.append((k, todo, lock.pop_all()))
    except BaseException:
        for _, _, lock in claimed:
            lock.close()
        raise
    return claimed, held_elsewhere


def _decode_claimed(encoded, size, crop, directory, labels, chunks, claimed, progress, *, tag):
    """Decodes the positions left in the `claimed` chunks, writes each chunk's file of
    labels and bad positions, and lets go of their locks, whatever raises."""
    with contextlib.ExitStack() as stack:
        for _, _, lock in claimed:
            stack.push(lock)
        writer = _RowWriter(directory, size, [start for start, _ in chunks])
        stack.callback(writer.close)  # Before the locks are let go.
        for k, _, _ in claimed:
            writer.add_log(k, _chunk_file(directory, k, ".i64", tag))
        todo = np.concatenate([positions for _, positions, _ in claimed])
        if labels is None:
            # tfds records: each claimed chunk's records read in order, their labels
            # with them (the rows already logged pass through undecoded).
            done = np.ones(encoded.count, bool)
            done[todo] = False
            chunk_labels, bad = _first_pass(
                encoded,
                size,
                crop,
                writer=writer,
                done=done,
                progress=progress,
                ranges=[chunks[k] for k, _, _ in claimed],
            )
            bad = np.asarray(bad, np.int64)
        else:
            chunk_labels = labels
            arrived = np.ones(len(todo), bool)
            if len(todo):  # Else every row was logged, and the pass killed before the end.
                arrived = _decode_positions(encoded, size, crop, todo, writer, progress)
            bad = todo[~arrived]
        for k, _, _ in claimed:
            start, stop = chunks[k]
            text = json.dumps(
                {
                    "start": start,
                    "stop": stop,
                    "labels": np.asarray(chunk_labels[start:stop]).tolist(),
                    "bad": bad[(bad >= start) & (bad < stop)].tolist(),
                }
            )
            run_dir.write_atomically(
                _chunk_file(directory, k, ".json", tag),
                lambda path, text=text: _write_text(path, text),
            )


def _decode_positions(encoded, size, crop, todo, writer, progress) -> np.ndarray:
    """Decodes the folder images at positions `todo` into `writer`.

    Returns:
      Which of `todo` arrived decoded (bool, one per position of `todo`).
    """
    records = tf.data.Dataset.from_tensor_slices((todo, stores.path_bytes(encoded.paths, todo)))
    # In any order (faster than keeping it): images are placed by position, and one
    # that fails to decode is the position that never arrives. Only decoding errors
    # are ignored: a write that fails (a full disk) stops the pass.
    dataset = records.map(
        lambda position, path: (position, decode.decode_to_size(tf.io.read_file(path), size, crop)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    dataset = dataset.batch(PASS_BATCH).prefetch(2)
    arrived = np.zeros(encoded.count, bool)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
    try:
        for positions, images in dataset.as_numpy_iterator():
            arrived[positions] = True
            writer.write(positions, images)
            progress.update(len(positions))
            _kill_for_tests(kill_after, progress, writer)
        positions, images = _read_again(encoded, todo[~arrived[todo]], size, crop)
        if len(positions):
            arrived[positions] = True
            writer.write(positions, images)
            progress.update(len(positions))
        # Returns once every row is on the disk and in the log (a power loss).
        writer.sync()
    except OSError as error:
        _raise_disk_full(error, writer, size)
    return arrived[todo]


def _read_again(encoded, positions, size, crop) -> tuple[np.ndarray, np.ndarray]:
    """Reads and decodes once more, one at a time, the files at `positions` (images
    that did not arrive decoded), to tell a bad image from a read error.

    A file that cannot be read now (a disk failing, a file removed or made unreadable
    since the listing) raises: it is not a bad image, and is not kept in the cache as
    one. A file that reads and decodes now (a read error that has cleared) is an
    image like any other. Only what does not decode from bytes read whole is bad.

    Returns:
      (the positions that decoded now (K,) int64, their images (K, size, size, 3)).

    Raises:
      UsageError: a file that cannot be read.
    """
    decoded, images = [], []
    if encoded.paths is None:  # Records in memory (tfds): nothing to read again.
        return np.zeros(0, np.int64), np.zeros((0, size, size, 3), np.uint8)
    for position in np.asarray(positions).tolist():
        path = encoded.paths[position]
        try:
            with open(path, "rb") as file:
                contents = file.read()
        except OSError as error:
            raise UsageError(
                f"cannot read {path} ({error.strerror}): a read error, not an image that "
                "does not decode; check the file and the disk, then rerun"
            ) from error
        try:
            image = decode.decode_to_size(tf.constant(contents), size, crop)
        except tf.errors.OpError:
            continue
        decoded.append(position)
        images.append(image.numpy())
    if decoded:
        logging.warning(
            "%s: %d images that did not decode in the first pass decoded when read again "
            "(a read error that cleared), the first %s",
            encoded.name,
            len(decoded),
            encoded.describe(decoded[0]),
        )
    return (
        np.asarray(decoded, np.int64),
        np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
    )


def _kill_for_tests(kill_after, progress, writer) -> None:
    """KILL_AFTER_ENV: SIGKILL this process once it has decoded that many images."""
    if kill_after and progress.count >= kill_after:
        if writer is not None:
            # The rows so far in the log first, so that the rerun has some to keep.
            writer.sync()
        os.kill(os.getpid(), signal.SIGKILL)


def _raise_disk_full(error: OSError, writer, size: int):
    """Raises `error`, or, for a full disk, the one line that says so."""
    if writer is None or not is_disk_full(error):
        raise error
    with contextlib.suppress(OSError):
        writer.sync()  # What is on the disk goes into the log, for the rerun.
    raise run_dir.disk_full_error(
        writer.path,
        stores.cached_bytes(size),
        at_least=True,
        kept="The images written so far are kept, and the rerun resumes the cache; "
        "--cache_dir puts it on another disk, --cache=memory or off keeps it off the disk.",
    ) from error


def _logged(directory: str, k: int, start: int, stop: int, tag: str) -> np.ndarray:
    """The positions of chunk `k` its log names: their rows are on the disk whole (a
    log cut in the middle of a position ignores that one)."""
    log = _chunk_file(directory, k, ".i64", tag)
    if not os.path.isfile(log):
        return np.zeros(0, np.int64)
    logged = np.fromfile(log, "<i8", count=os.path.getsize(log) // 8)
    return np.unique(logged[(logged >= start) & (logged < stop)])


def _write_manifest(encoded, size, crop, directory, chunks, tag):
    """Marks the cache complete from its chunks' files: (labels, bad positions)."""
    labels, bad = [], []
    for k, (start, stop) in enumerate(chunks):
        with open(_chunk_file(directory, k, ".json", tag)) as file:
            chunk = json.load(file)
        if (chunk["start"], chunk["stop"], len(chunk["labels"])) != (start, stop, stop - start):
            raise RuntimeError(
                f"the decoded cache {directory} holds chunks of another layout: delete it and rerun"
            )
        labels += chunk["labels"]
        bad += chunk["bad"]
    manifest = {
        "format": CACHE_FORMAT,
        "split": encoded.name,
        "size": size,
        "crop": crop,
        "fingerprint": encoded.fingerprint,
        "labels": labels,
        "bad": bad,
    }
    run_dir.write_atomically(
        os.path.join(directory, MANIFEST_FILE), lambda path: _write_text(path, json.dumps(manifest))
    )
    _sync_folder(directory)
    return np.asarray(labels, np.int32), bad


def _write_text(path: str, text: str) -> None:
    """Writes `text` to `path` and to the disk (fsync)."""
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _sync_folder(directory: str) -> None:
    """Puts the folder's entries (a rename into it) on the disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _RowWriter:
    """Writes decoded images into the cache's file of rows (allocated before, by
    `_allocated`), and their positions into their chunks' logs once the rows are on
    the disk.

    A background thread puts the rows written so far on the disk (fdatasync) and then
    appends their positions to the logs, one sync at a time, while decoding goes on:
    a log never names a row the disk does not hold, even after a power loss, and the
    pass does not wait for the disk. A kill redoes the rows written since the last
    sync. A write cut short (a filesystem that cannot allocate ahead) is a full disk,
    and its row is not logged.
    """

    def __init__(self, directory: str, size: int, starts: list[int]):
        self.row = stores.cached_bytes(size)
        self.path = stores.cache_file(directory)
        self.rows = os.open(self.path, os.O_RDWR)
        # The first position of each chunk, and the open logs of the chunks claimed.
        self.starts, self.logs = np.asarray(starts, np.int64), {}
        # Positions written and not yet logged, by chunk; the sync in flight; how many
        # positions this writer has logged.
        self.pending, self.syncing, self.logged = {}, None, 0
        # A sync failed: what it did not put on the disk may be lost even if a later
        # one succeeds (the kernel reports a writeback error once), so nothing more
        # is logged; the rerun decodes those rows again.
        self.failed = False
        self.syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-sync")

    def add_log(self, k: int, path: str) -> None:
        """Opens chunk `k`'s log, to append to."""
        # Unbuffered: a position is in the log once its write returns, and a failed
        # write is not tried again at close.
        self.logs[k] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        # A kill during a log write can leave a part of a position: drop it.
        os.ftruncate(self.logs[k], os.fstat(self.logs[k]).st_size // 8 * 8)
        os.lseek(self.logs[k], 0, os.SEEK_END)

    def write(self, positions: np.ndarray, images: np.ndarray) -> None:
        """Writes the rows; their positions reach the logs once the rows are on the disk."""
        for position, image in zip(positions.tolist(), images):
            if os.pwrite(self.rows, image, position * self.row) != self.row:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        chunk_of = np.searchsorted(self.starts, positions, side="right") - 1
        for k in np.unique(chunk_of).tolist():
            self.pending.setdefault(k, []).append(np.asarray(positions[chunk_of == k], "<i8"))
        if self.syncing is None or self.syncing.done():
            self._collect()
            self.syncing = self.syncer.submit(self._sync_and_log, self._take_pending())

    def sync(self) -> None:
        """Waits until every row written is on the disk and in its log, and the logs on
        the disk."""
        self._collect()
        self._sync_and_log(self._take_pending())
        for log in self.logs.values():
            os.fsync(log)

    def _take_pending(self) -> dict[int, bytes]:
        entries = {
            k: b"".join(positions.tobytes() for positions in arrays)
            for k, arrays in self.pending.items()
        }
        self.pending = {}
        return entries

    def _sync_and_log(self, entries: dict[int, bytes]) -> None:
        if not entries or self.failed:
            return
        try:
            os.fdatasync(self.rows)
            for k, data in entries.items():
                if os.write(self.logs[k], data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
                self.logged += len(data) // 8
        except BaseException:
            self.failed = True
            raise

    def _collect(self) -> None:
        """Raises the error of the sync in flight, if it failed, once it has ended."""
        syncing, self.syncing = self.syncing, None
        if syncing is not None:
            syncing.result()

    def close(self) -> None:
        if self.rows >= 0:
            # The sync in flight uses the descriptors; its error, if any, was
            # raised by `sync` or gives way to the one being raised.
            self.syncer.shutdown(wait=True)
            os.close(self.rows)
            for log in self.logs.values():
                os.close(log)
            self.rows = -1


def _first_pass(
    encoded,
    size,
    crop,
    *,
    images=None,
    writer=None,
    done=None,
    progress=None,
    labels=None,
    ranges=None,
):
    """Decodes every image not `done` into `images` (memory) or `writer` (disk), or,
    with neither, only to find those that do not decode (`_scan`).

    Args:
      encoded: the split.
      size, crop: how images are stored.
      images: (count, size, size, 3) uint8 to fill (memory).
      writer: a `_RowWriter` (disk), its log open.
      done: (count,) bool, positions already written: not decoded again.
      progress: a `_Progress` to count decoded images in; by default one of this pass.
      labels: the labels when known before decoding (folders): those of the images
        that decode only when read again (`_read_again`).
      ranges: the (start, stop) ranges of positions to read (`encoded.read_range`);
        by default the whole split.

    Returns:
      (labels of every position read (0 elsewhere), positions read that could not be
      decoded).
    """
    resuming = done is not None and done.any()
    todo_array = ~done if resuming else np.ones(encoded.count, bool)
    todo = tf.constant(todo_array)

    empty = tf.zeros((size, size, 3), tf.uint8)

    def decode_one(position, key, label):
        def work():
            contents = tf.io.read_file(key) if encoded.reads_files else key
            return decode.decode_to_size(contents, size, crop)

        if not resuming:
            return position, label, work()
        # Positions already written pass through undecoded: their labels are still read.
        return position, label, tf.cond(todo[position], work, lambda: empty)

    ranges = ranges or [(0, encoded.count)]
    read = np.zeros(encoded.count, bool)
    parts = []
    for start, stop in ranges:
        read[start:stop] = True
        records = (
            encoded.make_records()
            if (start, stop) == (0, encoded.count)
            else encoded.read_range(start, stop)
        )
        parts.append(tf.data.Dataset.zip(tf.data.Dataset.range(start, stop), records))
    dataset = functools.reduce(tf.data.Dataset.concatenate, parts)
    # In any order, as in `_decode_positions`.
    dataset = dataset.map(
        lambda position, record: decode_one(position, *record),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    dataset = dataset.batch(PASS_BATCH).prefetch(2)
    known_labels, labels = labels, np.zeros(encoded.count, np.int32)
    arrived = np.zeros(encoded.count, bool)
    own_progress = progress is None
    if own_progress:
        progress = _Progress(encoded, int(todo_array.sum()))
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
    try:
        for positions, batch_labels, batch_images in dataset.as_numpy_iterator():
            arrived[positions] = True
            labels[positions] = batch_labels
            fresh = todo_array[positions]
            if images is not None:
                images[positions] = batch_images
            elif writer is not None and fresh.all():
                writer.write(positions, batch_images)
            elif writer is not None:
                writer.write(positions[fresh], batch_images[fresh])
            progress.update(int(fresh.sum()))
            _kill_for_tests(kill_after, progress, writer)
        positions, batch_images = _read_again(encoded, np.flatnonzero(~arrived), size, crop)
        if len(positions):
            arrived[positions] = True
            labels[positions] = known_labels[positions]
            if images is not None:
                images[positions] = batch_images
            elif writer is not None:
                writer.write(positions, batch_images)
            progress.update(len(positions))
        if writer is not None:
            # Returns once every row is on the disk and in the log (a power loss).
            writer.sync()
    except OSError as error:
        _raise_disk_full(error, writer, size)
    if own_progress:
        progress.close()
    return labels, np.flatnonzero(read & ~arrived).tolist()


class _Progress:
    """A Keras progress bar of the first pass, with images/s and the ETA."""

    def __init__(self, encoded: EncodedSplit, total: int):
        import keras

        self.start, self.count, self.total, self.name = time.monotonic(), 0, total, encoded.name
        self.others = 0
        logging.info("decoding %d %s images (the first pass)", total, encoded.name)
        # A pass of a few hundred images ends in seconds: the log lines say enough.
        self.bar = None
        if total >= PROGRESS_BAR_IMAGES:
            self.bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["images/s"])

    def update(self, decoded: int) -> None:
        """Counts images decoded here."""
        self.count += decoded
        rate = self.count / max(time.monotonic() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(min(self.count + self.others, self.total), values=[("images/s", rate)])

    def elsewhere(self, written: int) -> None:
        """Counts images another process wrote during this pass: toward the bar's
        total and its ETA, not this process's rate."""
        self.others += written
        self.update(0)

    def close(self) -> None:
        seconds = time.monotonic() - self.start
        logging.info(
            "decoded %d %s images in %.1f s (%.0f images/s)",
            self.count,
            self.name,
            seconds,
            self.count / max(seconds, 1e-9),
        )
