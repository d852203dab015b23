"""The decoded cache: every image of a split decoded once, kept in memory or on disk.

    encoded split (files, tfds records) -> parallel read + decode to --source_size
    (`first_pass`) -> memory (an array) | disk (a folder under --cache_dir,
    `cache_files`) -> a Split

A disk cache's folder is named after what its images are (the split's files, the size,
the crop): a changed file gets a new folder (`cache_files` says who writes it). With
--cache=off only the positions of bad images are kept (--on_bad_image=skip).
"""

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from effpipe.data import cache_files, first_pass, stores
from effpipe.data.splits import Split
from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """The encoded images of one split, in a fixed order: what the first pass decodes.

    Attributes:
      name: names the split in logs and its cache folder ("folder-train").
      fingerprint: digest of what the images are (file list, sizes, times).
      make_records: () -> dataset of (key, label) in position order; a key is a path
        to read (`paths` is set) or the encoded bytes themselves (tfds).
      describe: position -> how to name that image in a message (its path).
      paths: the files of a folder, which --cache=off decodes on every pass.
      labels: their labels (N,) int32, known before decoding (a folder).
    """

    name: str
    count: int
    fingerprint: str
    make_records: Callable[[], tf.data.Dataset]
    describe: Callable[[int], str]
    paths: tuple[str, ...] | None = None
    labels: np.ndarray | None = None

    def subset(self, positions: np.ndarray, name: str) -> "EncodedSplit":
        """The images at `positions`, in that order (a worker's shard): only they are read."""
        positions = np.asarray(positions, np.int64)
        if np.any(np.diff(positions) <= 0):
            raise ValueError("a subset's positions must be increasing")
        mask = np.zeros(self.count, bool)
        mask[positions] = True
        wanted = tf.constant(mask)

        def make_records():
            records = self.make_records().enumerate().filter(lambda position, _: wanted[position])
            return records.map(lambda position, record: record)

        return EncodedSplit(
            name=name,
            count=len(positions),
            fingerprint=hashlib.sha256(self.fingerprint.encode() + positions.tobytes()).hexdigest(),
            make_records=make_records,
            describe=lambda position: self.describe(int(positions[position])),
            paths=None if self.paths is None else tuple(self.paths[p] for p in positions),
            labels=None if self.labels is None else self.labels[positions],
        )


def materialize(
    encoded: EncodedSplit,
    *,
    size: int,
    crop: str,
    mode: str,
    cache_root: str,
    memory_budget_mb: int,
    on_bad_image: str,
) -> tuple[Split, tuple[str, ...]]:
    """Decodes a split once into memory or the disk cache, or reuses the disk cache.

    `mode` is --cache: "auto" (memory up to `memory_budget_mb`, else disk), "memory",
    "disk" or "off" (decode on every pass); `size` and `crop` say how images are
    stored (effpipe.data.decode); `on_bad_image` is "fail" or "skip". Returns the
    split over its store and the names of skipped images.

    Raises:
      UsageError: a bad image with "fail", no image that decodes, a file that cannot
        be read, a full disk, or "off" for a source without files (tfds).
    """
    decoded_mb = encoded.count * stores.cached_bytes(size) / 2**20
    if mode == "auto":
        mode = "memory" if decoded_mb <= memory_budget_mb else "disk"
    directory = os.path.join(cache_root, folder_name(encoded, size, crop))
    if mode == "off":
        store, labels, bad = _uncached(encoded, size, crop, directory, on_bad_image)
    elif mode == "memory":
        images = np.empty((encoded.count, size, size, 3), np.uint8)
        sink = first_pass.MemorySink(images, encoded.count)
        labels, bad = first_pass.decode(encoded, size, crop, sink)
        store = stores.ArrayStore(images)
    else:
        labels, bad = _disk_cache(encoded, size, crop, directory)
        store = stores.CacheStore(directory, size, encoded.count)
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
        message = (
            "skipped %d of %d %s images that cannot be decoded (--on_bad_image=skip), first %s"
        )
        logging.warning(message, len(skipped), encoded.count, encoded.name, ", ".join(skipped[:3]))
    where = {"off": "decoded on every pass", "memory": "in memory"}.get(mode, directory)
    logging.info("%s: %d images, %.0f MB decoded, %s", encoded.name, len(kept), decoded_mb, where)
    return Split(store, np.asarray(labels)[kept], kept.astype(np.int64)), skipped


def folder_name(encoded: EncodedSplit, size: int, crop: str) -> str:
    """The cache folder of a split at a size and crop (the decoder is in its manifest)."""
    key = f"{encoded.fingerprint}\0{size}\0{crop}\0{encoded.count}"
    return f"{encoded.name}-{size}px-{crop}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _uncached(encoded, size, crop, directory, on_bad_image):
    """--cache=off: the split over its files, decoded on every pass. With
    --on_bad_image=skip the files are decoded once first to find the bad ones (kept as
    a manifest without rows, so later runs do not scan again): the run's splits and
    metrics do not depend on --cache."""
    if encoded.paths is None:
        raise UsageError(
            f"--cache=off decodes a folder's files on every pass; the {encoded.name} split "
            "is tfds records, which cannot be read by position: use --cache=auto, memory "
            "or disk"
        )
    store = stores.FileStore(encoded.paths, size, crop)
    if on_bad_image != "skip":
        return store, encoded.labels, []
    directory += "-scan"
    os.makedirs(directory, exist_ok=True)
    with cache_files.writer_lock(encoded, directory):
        manifest = cache_files.read_manifest(encoded, directory, size, crop)
        if manifest is None:
            message = "%s: decoding every image once to find those that do not decode"
            logging.info(message, encoded.name)
            sink = first_pass.MemorySink(None, encoded.count)
            labels, bad = first_pass.decode(encoded, size, crop, sink)
            cache_files.write_manifest(directory, size, crop, labels, bad, fingerprints=[])
            return store, labels, bad
    return store, np.asarray(manifest["labels"], np.int32), manifest["bad"]


def _disk_cache(encoded, size, crop, directory):
    """(labels, bad positions) of the complete, verified cache in `directory`, written
    (or resumed) here first when there is none."""
    os.makedirs(directory, exist_ok=True)
    with cache_files.writer_lock(encoded, directory):
        manifest = cache_files.read_manifest(encoded, directory, size, crop)
        if manifest is not None and cache_files.verified(encoded, directory, size, manifest):
            logging.info("%s: reusing the decoded cache %s", encoded.name, directory)
            return np.asarray(manifest["labels"], np.int32), manifest["bad"]
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, cache_files.MANIFEST_FILE))
        with cache_files.RowFile(encoded, directory, size, crop) as rows:
            labels, bad = first_pass.decode(encoded, size, crop, rows)
            rows.finish(labels, bad)
        return labels, bad
