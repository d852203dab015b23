"""Where a split's images are, and how tf.data reads image number `position`.

    ArrayStore   decoded uint8 rows in memory (shapes; --cache=memory)
    FileStore    encoded files, read and decoded on every pass (--cache=off)
    CacheStore   the decoded cache on disk: one file per image (--cache=disk)

The input pipeline streams `keys` (an array row, a path, a cache position), shuffles
them, and maps `fetch` over them in parallel: a shuffle buffer holds keys, never a
decoded photo, and the same keys in the same order give the same images whatever the
store, so a run's batches do not depend on where its images are kept.

Why one file per decoded image and not TFRecord or `Dataset.save` shards: a file
is addressable by position, so every pass is a uniform shuffle over positions, a
killed first pass resumes where it stopped (each finished file stays), and the
page cache serves the files at memory speed once read (WORKSPACE.md has the
measurements).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from effpipe.data import decode

# Cache files per subfolder: small enough for any filesystem's directories.
FILES_PER_FOLDER = 1000
# A cache file is the image's rows, height x width x 3 bytes with no header: one copy
# from the file's bytes to the tensor on every read (a serialized TensorProto took two).
CACHE_SUFFIX = ".rgb"


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
    """The decoded cache: position i's image in `cache_path(directory, i)`.

    Attributes:
      directory: the cache's folder (effpipe.data.cache).
      size: side in pixels of the stored images.
    """

    directory: str
    size: int


def cache_path(directory: str, position: int) -> str:
    """The file that holds decoded image `position` of a cache folder."""
    return os.path.join(
        directory, f"{position // FILES_PER_FOLDER:05d}", f"{position}{CACHE_SUFFIX}"
    )


def cache_path_tensor(directory: str, position: tf.Tensor) -> tf.Tensor:
    """`cache_path` in the graph, for int64 `position`."""
    return tf.strings.join(
        [
            directory + os.sep,
            tf.strings.as_string(position // FILES_PER_FOLDER, width=5, fill="0"),
            os.sep,
            tf.strings.as_string(position),
            CACHE_SUFFIX,
        ]
    )


def raw_bytes(image: tf.Tensor) -> tf.Tensor:
    """A uint8 (H, W, 3) image as the bytes of a cache file, in the graph."""
    serialized = tf.io.serialize_tensor(image)
    # A TensorProto ends with its tensor_content, the rows themselves.
    length = tf.size(image)
    return tf.strings.substr(serialized, -length, length)


def cached_bytes(size: int) -> int:
    """The length of a whole cache file of a `size` px image."""
    return size * size * 3


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
        return np.asarray(store.paths, dtype=object)[positions].astype(bytes)
    return np.asarray(positions, dtype=np.int64)


def fetch(store):
    """key -> uint8 image (H, W, 3), a function for `Dataset.map`."""
    if isinstance(store, ArrayStore):
        return tf.identity
    if isinstance(store, FileStore):
        return lambda path: decode.decode_to_size(tf.io.read_file(path), store.size, store.crop)
    size = store.size

    def read_cached(position):
        contents = tf.io.read_file(cache_path_tensor(store.directory, position))
        return tf.reshape(tf.io.decode_raw(contents, tf.uint8), (size, size, 3))

    return read_cached


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
    dataset = tf.data.Dataset.from_tensor_slices(keys(store, positions)).map(
        fetch(store), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return np.concatenate(list(dataset.batch(256).as_numpy_iterator()))
