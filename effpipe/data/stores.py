"""Where a split's images are, and how tf.data reads image number `position`.

    ArrayStore   decoded uint8 rows in memory (shapes; --cache=memory)
    FileStore    a folder's encoded files, decoded on every pass (--cache=off)
    CacheStore   the decoded cache on disk: one file, image i at row i (--cache=disk)

The pipeline shuffles positions, not photos. The cache is one file of rows, not TFRecord
shards, so any row is read by position: every pass is a uniform shuffle, a resumed run
reads only the epochs it trains, and a killed first pass resumes where it stopped.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from effpipe.data import decode

# The decoded cache's images: row i (height x width x 3 bytes, no header) is image i.
CACHE_FILE = "images.u8"


@dataclasses.dataclass(frozen=True)
class ArrayStore:
    """Decoded images (N, H, W, 3) uint8 in memory; position i is row i."""

    images: np.ndarray


@dataclasses.dataclass(frozen=True)
class FileStore:
    """Encoded image files (position i is `paths[i]`) decoded at every read to `size` px
    (bad images are left out of the split beforehand: `cache`)."""

    paths: tuple[str, ...]
    size: int
    crop: str


@dataclasses.dataclass(frozen=True)
class CacheStore:
    """The decoded cache: position i's image is row i of `cache_file(directory)`, one row
    per encoded image (`count`; an image that did not decode has a row never read)."""

    directory: str
    size: int
    count: int


def cache_file(directory: str) -> str:
    """The file of rows of a cache folder."""
    return os.path.join(directory, CACHE_FILE)


def cached_bytes(size: int) -> int:
    """The length of one row of the cache file: a `size` px image."""
    return size * size * 3


def image_size(store) -> tuple[int, int]:
    """(height, width) of the images `store` yields."""
    if isinstance(store, ArrayStore):
        return tuple(store.images.shape[1:3])
    return (store.size, store.size)


def keys(store, positions: np.ndarray) -> np.ndarray:
    """What the pipeline streams: the images (memory), their paths (files) or positions."""
    if isinstance(store, ArrayStore):
        return store.images[positions]
    if isinstance(store, FileStore):
        return path_bytes(store.paths, positions)
    return np.asarray(positions, dtype=np.int64)


def path_bytes(paths, positions=None) -> np.ndarray:
    """The paths at `positions` (all by default) as the file system's bytes, so a string
    tensor holds any name the folder holds, in any encoding."""
    if positions is not None:
        paths = [paths[position] for position in np.asarray(positions).tolist()]
    return np.asarray([os.fsencode(path) for path in paths], dtype=bytes)


def fetch(store: FileStore):
    """path -> uint8 image (H, W, 3), a function for `Dataset.map` (the other stores
    are read a batch at a time)."""
    return lambda path: decode.decode_to_size(tf.io.read_file(path), store.size, store.crop)


def fetch_batch(store: CacheStore, *, in_process: bool = True):
    """positions (B,) int64 -> images (B, H, W, 3) uint8, for `Dataset.map` after `batch`.

    Two reads, each measured necessary where it is used. In this process Python reads
    each row into the batch (`os.preadv`, without the interpreter lock): only batches
    in flight are held. A tf.data service's workers run no Python: TensorFlow maps the
    file (ImmutableConst) and gathers, as fast, but an epoch of that grew a process's
    anonymous memory by the whole file (1.2 GB over 8,000 photos at 224 px; preadv 15 MB).
    """
    path, size = cache_file(store.directory), store.size
    if not in_process:
        shape = [store.count, size, size, 3]
        return lambda positions: tf.gather(
            tf.raw_ops.ImmutableConst(dtype=tf.uint8, shape=shape, memory_region_name=path),
            positions,
        )

    def read(positions):
        images = tf.numpy_function(
            lambda rows: read_rows(path, rows, size), [positions], tf.uint8, stateful=False
        )
        # The positions' static batch size (training drops the remainder) stays.
        return tf.ensure_shape(images, positions.shape.concatenate((size, size, 3)))

    return read


def read_rows(path: str, positions: np.ndarray, size: int) -> np.ndarray:
    """Rows `positions` of the cache file at `path`, (N, size, size, 3) uint8, read one
    call a row straight into the result.

    Raises:
      OSError: the file is shorter than the rows asked for.
    """
    row = cached_bytes(size)
    images = np.empty((len(positions), size, size, 3), np.uint8)
    rows = images.reshape(len(positions), row)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for index, position in enumerate(np.asarray(positions).tolist()):
            if os.preadv(descriptor, [rows[index]], position * row) != row:
                raise OSError(f"the decoded cache {path} ends before image {position}")
    finally:
        os.close(descriptor)
    return images


def load_images(store, positions: np.ndarray) -> np.ndarray:
    """The images at `positions`, decoded into one array (samples, small splits)."""
    positions = np.asarray(positions, np.int64)
    if isinstance(store, ArrayStore):
        return store.images[positions]
    if isinstance(store, CacheStore):
        return read_rows(cache_file(store.directory), positions, store.size)
    if len(positions) == 0:
        return np.zeros((0, store.size, store.size, 3), np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices(keys(store, positions)).map(
        fetch(store), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return np.concatenate(list(dataset.batch(256).as_numpy_iterator()))
