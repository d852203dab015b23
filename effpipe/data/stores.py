"""Where a split's images are, and how tf.data reads image number `position`.

    ArrayStore   decoded uint8 rows in memory (shapes; --cache=memory)
    FileStore    encoded files, read and decoded on every pass (--cache=off)
    CacheStore   the decoded cache on disk: one file of rows, image i at row i
                 (--cache=disk)
    RecordStore  tfds records, read in a stream and decoded on every pass (--cache=off)

The input pipeline streams `keys` (an array row, a path, a cache position), shuffles
them, and maps `fetch` over them in parallel: a shuffle buffer holds keys, never a
decoded photo, and the same keys in the same order give the same images whatever the
store, so a run's batches do not depend on where its images are kept. A CacheStore
is read a batch at a time (`fetch_batch`): the batch's positions, then their rows.

Why one file of rows and not TFRecord or `Dataset.save` shards: a row is addressable
by position, so every pass is a uniform shuffle over positions and a killed first
pass resumes where it stopped (a log names the rows written whole); and a batch is
read with one call per image straight into the batch's memory, with no tf.data
element per image, which bounded the one-file-per-image cache before it (README's
photo table has both).

A RecordStore is the exception: tfds records are not addressable one by one, so its
images are streamed (`effpipe.data.pipeline`) with the tfds files shuffled and
sharded, and a shuffle buffer of encoded records sized in MB; a position is still
the record's place in the split, read in order, as the cache numbers it.
"""

import dataclasses
import os
import weakref
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from effpipe.data import decode

# The decoded cache's images: row i (height x width x 3 bytes, no header) is image i.
CACHE_FILE = "images.u8"
# TensorFlow takes a numpy array's memory as a tensor's without a copy when it is
# aligned to this many bytes (Eigen's largest alignment).
TENSOR_ALIGNMENT = 64


@dataclasses.dataclass(frozen=True)
class ArrayStore:
    """Decoded images (N, H, W, 3) uint8 in memory; position i is row i."""

    images: np.ndarray


@dataclasses.dataclass(frozen=True)
class FileStore:
    """Encoded image files, decoded at every read.

    Attributes:
      paths: position i's file.
      size: side in pixels images are decoded to.
      crop: "resize" or "centre" (effpipe.data.decode).
      skip_bad: drop images that cannot be decoded instead of failing
        (--on_bad_image=skip).
    """

    paths: tuple[str, ...]
    size: int
    crop: str
    skip_bad: bool = False


@dataclasses.dataclass(frozen=True)
class CacheStore:
    """The decoded cache: position i's image is row i of `cache_file(directory)`.

    Attributes:
      directory: the cache's folder (effpipe.data.cache).
      size: side in pixels of the stored images.
      count: rows in the file, one per image of the encoded split (the row of an
        image that did not decode is never read).
    """

    directory: str
    size: int
    count: int


@dataclasses.dataclass(frozen=True)
class RecordStore:
    """The encoded records of a tfds split, read and decoded on every pass.

    Attributes:
      read: (shuffle_seed, (count, index)) -> dataset of (position int64, encoded
        image string, label int64), each record of the split once: its files in order
        when `shuffle_seed` is None, else in a seeded order drawn anew each pass; with
        count > 1 only the index-th of `count` shares of the files.
      count: records in the split.
      num_files: files the split is stored in.
      record_bytes: mean size of an encoded record (sizes shuffle buffers in MB).
      size: side in pixels images are decoded to.
      crop: "resize" or "centre" (effpipe.data.decode).
      skip_bad: drop images that cannot be decoded instead of failing.
    """

    read: Callable[[int | None, tuple[int, int]], tf.data.Dataset]
    count: int
    num_files: int
    record_bytes: int
    size: int
    crop: str
    skip_bad: bool = False


def cache_file(directory: str) -> str:
    """The file of rows of a cache folder."""
    return os.path.join(directory, CACHE_FILE)


def cached_bytes(size: int) -> int:
    """The length of one row of the cache file: a `size` px image."""
    return size * size * 3


def read_rows(path: str, positions: np.ndarray, size: int, *, pooled: bool = False) -> np.ndarray:
    """Rows `positions` of the cache file at `path`, (N, size, size, 3) uint8.

    One read per row straight into the result, which is aligned so TensorFlow takes
    it as a tensor without a copy (`fetch_batch`).

    Args:
      path: the cache file.
      positions: the rows to read, in the order wanted.
      size: side in pixels of the stored images.
      pooled: read into a buffer of `_BATCH_BUFFERS`, which takes it back once the
        result is released (the training stream's batches).

    Raises:
      OSError: the file is missing or shorter than the rows asked for.
    """
    row = cached_bytes(size)
    images = (_BATCH_BUFFERS.take if pooled else _aligned)((len(positions), size, size, 3))
    rows = images.reshape(len(positions), row)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for index, position in enumerate(np.asarray(positions).tolist()):
            if os.preadv(descriptor, [rows[index]], position * row) != row:
                raise OSError(
                    f"the decoded cache {path} ends before image {position}: delete its "
                    "folder and rerun, which decodes the images again"
                )
    finally:
        os.close(descriptor)
    return images


def _aligned(shape: tuple[int, ...], buffer: np.ndarray | None = None) -> np.ndarray:
    """An uninitialized uint8 array of `shape` aligned to TENSOR_ALIGNMENT, in `buffer`
    (of the size `_aligned` gives it) or a new one."""
    nbytes = int(np.prod(shape))
    if buffer is None:
        buffer = np.empty(nbytes + TENSOR_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % TENSOR_ALIGNMENT
    return buffer[start : start + nbytes].reshape(shape)


class _BufferPool:
    """Batch buffers handed back once the array made from one is released.

    A new buffer of a batch's megabytes costs a page fault per 4 KB it is first
    written to, about as much as reading the rows into it; the allocator returns
    such buffers to the system when freed, so every batch paid it again. A buffer
    returns here only when nothing refers to the array made from it any more
    (TensorFlow holds the array for as long as the tensor that shares its memory
    lives), and at most `keep` of each size wait here.
    """

    def __init__(self, keep: int):
        self.keep, self.free = keep, {}

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        free = self.free.setdefault(shape, [])
        images = _aligned(shape, free.pop() if free else None)
        weakref.finalize(images, self._give_back, free, images.base)
        return images

    def _give_back(self, free: list, buffer: np.ndarray) -> None:
        if len(free) < self.keep:
            free.append(buffer)


# Batches in flight in a training stream: the parallel reads, the prefetch buffer
# and the step's own batch.
_BATCH_BUFFERS = _BufferPool(keep=8)


def image_size(store) -> tuple[int, int]:
    """(height, width) of the images `store` yields."""
    if isinstance(store, ArrayStore):
        return tuple(store.images.shape[1:3])
    return (store.size, store.size)


def keys(store, positions: np.ndarray) -> np.ndarray:
    """What the pipeline streams for these positions: the images themselves (memory),
    their paths (files) or the positions (cache)."""
    if isinstance(store, ArrayStore):
        return store.images[positions]
    if isinstance(store, FileStore):
        return path_bytes(store.paths, positions)
    return np.asarray(positions, dtype=np.int64)


def path_bytes(paths, positions=None) -> np.ndarray:
    """The paths at `positions` (all by default) as the file system's bytes, for a
    string tensor: any name the folder holds, in any encoding."""
    if positions is not None:
        paths = [paths[position] for position in np.asarray(positions).tolist()]
    return np.asarray([os.fsencode(path) for path in paths], dtype=bytes)


def fetch(store):
    """key -> uint8 image (H, W, 3), a function for `Dataset.map`."""
    if isinstance(store, ArrayStore):
        return tf.identity
    if isinstance(store, FileStore):
        return lambda path: decode.decode_to_size(tf.io.read_file(path), store.size, store.crop)
    raise TypeError(f"a {type(store).__name__} is not fetched one key at a time")


def fetch_batch(store: CacheStore, *, in_process: bool):
    """positions (B,) int64 -> images (B, H, W, 3) uint8, for `Dataset.map` after `batch`.

    Args:
      store: the decoded cache.
      in_process: the dataset runs in this process. Then each row is read into the
        batch by Python (`read_rows`, the file's reads release the interpreter lock),
        and the process's memory holds only the batches in flight. Otherwise (a
        tf.data service's worker, which runs a serialized graph and no Python) the
        file is memory-mapped by TensorFlow's ImmutableConst and the batch gathered
        from it: as fast, but every page read stays in the worker's resident memory
        (page cache, which the kernel reclaims under pressure).
    """
    path, size = cache_file(store.directory), store.size
    if in_process:

        def read(positions):
            images = tf.numpy_function(
                lambda rows: read_rows(path, rows, size, pooled=True),
                [positions],
                tf.uint8,
                stateful=False,
            )
            # The positions' static batch size (training drops the remainder) stays.
            return tf.ensure_shape(images, positions.shape.concatenate((size, size, 3)))

        return read

    def gather(positions):
        rows = tf.raw_ops.ImmutableConst(
            dtype=tf.uint8, shape=[store.count, size, size, 3], memory_region_name=path
        )
        return tf.gather(rows, positions)

    return gather


def load_images(store, positions: np.ndarray) -> np.ndarray:
    """The images at `positions`, decoded into one array (samples, small splits)."""
    if isinstance(store, ArrayStore):
        if len(positions) == len(store.images) and np.array_equal(
            positions, np.arange(len(positions))
        ):
            return store.images  # The whole array in order: no copy.
        return store.images[positions]
    size = image_size(store)
    if len(positions) == 0:
        return np.zeros((0, *size, 3), np.uint8)
    if isinstance(store, RecordStore):
        return _load_records(store, positions)
    if isinstance(store, CacheStore):
        return read_rows(cache_file(store.directory), positions, store.size)
    dataset = tf.data.Dataset.from_tensor_slices(keys(store, positions)).map(
        fetch(store), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return np.concatenate(list(dataset.batch(256).as_numpy_iterator()))


def keep_positions(store: RecordStore, positions: np.ndarray):
    """A `filter` predicate over (position, encoded, label) records: those at `positions`."""
    wanted = np.zeros(store.count, bool)
    wanted[positions] = True
    mask = tf.constant(wanted)
    return lambda position, encoded, label: mask[position]


def _decoded_records(store: RecordStore, positions: np.ndarray) -> tf.data.Dataset:
    """(position, image) of the records at `positions`, read in order; the reading
    stops after the last of them, and only they are decoded."""
    return (
        store.read(None, (1, 0))
        .filter(keep_positions(store, positions))
        .take(len(np.unique(positions)))
        .map(
            lambda position, encoded, label: (
                position,
                decode.decode_to_size(encoded, store.size, store.crop),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )


def _load_records(store: RecordStore, positions: np.ndarray) -> np.ndarray:
    """The records at `positions`, in that order."""
    found = {}
    for batch_positions, images in (
        _decoded_records(store, positions).batch(256).as_numpy_iterator()
    ):
        found.update(zip(batch_positions.tolist(), images))
    return np.stack([found[int(position)] for position in positions])
