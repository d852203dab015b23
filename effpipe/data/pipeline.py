"""The host input pipeline: one linear tf.data chain from a split to batches.

    training:  epochs from initial_epoch -> each epoch's order of positions ->
               fetch (read, decode) -> batch -> tf.data service (optional) -> prefetch
    one pass:  positions in order -> fetch -> batch -> ... -> prefetch

In-memory images and the decoded cache are fetched after `batch` (a batch of
positions, then their rows). Epoch e's order is a permutation of the positions drawn
from (seed, e) alone, so a run resumed at epoch k reads nothing of the epochs before,
and every store (`effpipe.data.stores`) yields the same images in the same order.
`make_feature_dataset` runs the same chain over cached per-image features.

Images stay uint8 at source resolution on the host (a 32x32x3 CIFAR image is 3 KB,
at 456 px float32 2.5 MB): the cast, augmentation and resize run on the device.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from effpipe.config import RuntimeConfig
from effpipe.data import splits, stores


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the chain that do not change what it yields."""

    deterministic: bool = False  # Element order fixed run to run (slower parallel stages).
    autotune: bool = True  # tf.data tunes parallelism and buffer sizes.
    threads: int = 0  # A private thread pool of this size; 0: the shared one.


@dataclasses.dataclass(frozen=True)
class DataService:
    """A tf.data service that runs the chain on its workers instead of this process:
    consumers naming the same job share its stream, each element going to one of them
    (the workers of a multi-worker run)."""

    address: str  # grpc://HOST:PORT of the dispatcher.
    job_name: str


def make_dataset(
    split: splits.Split | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    initial_epoch: int = 0,
    batches_per_epoch: int | None = None,
    options: PipelineOptions = PipelineOptions(),
    data_service: DataService | None = None,
) -> tf.data.Dataset:
    """The batched dataset of (images (B, H, W, 3) uint8, labels (B,) int32); in training
    B is static.

    Args:
      split: the examples (`effpipe.data.splits.Split`), or their images in memory,
        (N, H, W, 3) uint8 at source resolution, with their (N,) `labels`.
      batch_size: examples per batch (the per-replica batch under a strategy).
      is_training: an endless stream of epochs, each in its own order and of
        `batches_per_epoch` full batches; else one pass in order, its last batch
        partial.
      initial_epoch: the epoch the training stream starts at (a resumed run's).
      batches_per_epoch: batches of one training epoch (fit's steps_per_epoch times
        the batches each step takes); by default every full batch of the examples.

    Raises:
      ValueError: images in memory that are not uint8; an epoch longer than the
        examples.
    """
    if labels is not None:
        split = splits.Split(split, labels)
    store = split.store
    if isinstance(store, stores.ArrayStore) and store.images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 at source resolution, got {store.images.dtype}")
    dataset = _batched_stream(
        stores.keys(store, split.positions),
        split.labels,
        batch_size,
        (seed, initial_epoch, batches_per_epoch) if is_training else None,
        fetch=stores.fetch(store) if isinstance(store, stores.FileStore) else None,
        fetch_batch=(
            stores.fetch_batch(store, in_process=data_service is None)
            if isinstance(store, stores.CacheStore)
            else None
        ),
    )
    return _serve(dataset, is_training, options, data_service)


def make_feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    initial_epoch: int = 0,
    batches_per_epoch: int | None = None,
    options: PipelineOptions = PipelineOptions(),
) -> tf.data.Dataset:
    """The same chain over per-image features (N, F) float32 (row i from image i of the
    split) instead of images: (features (B, F) float32, labels (B,) int32).

    Epochs' orders come from the seed, the epoch and the number of examples, never
    their values, so for the same arguments and examples this yields `make_dataset`'s
    labels batch for batch: phase 1 on cached features sees phase 1's image batches.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (examples, size), got shape {features.shape}")
    epochs = (seed, initial_epoch, batches_per_epoch) if is_training else None
    dataset = _batched_stream(features, np.asarray(labels), batch_size, epochs)
    return _serve(dataset, is_training, options)


def _positions(count, epochs, batch_size):
    """The stream of positions: one pass in order (`epochs` None), or the orders of
    the epochs (seed, first epoch, batches per epoch or None), endless."""
    positions = np.arange(count, dtype=np.int64)
    if epochs is None:
        return tf.data.Dataset.from_tensor_slices(positions)
    seed, first, batches = epochs
    batches = count // batch_size if batches is None else batches
    if not 0 < batches * batch_size <= count:
        raise ValueError(
            f"an epoch of {batches} batches of {batch_size} needs more than the "
            f"{count} examples: lower the batch size"
        )
    seed, positions = tf.constant(seed, tf.int64), tf.constant(positions)

    def order_of(epoch):
        # From (seed, epoch) alone: a stream started at epoch k skips the epochs before.
        # It holds exactly the batches fit takes in one epoch, so epochs stay fit's.
        order = tf.random.experimental.stateless_shuffle(positions, seed=tf.stack([seed, epoch]))
        return order[: batches * batch_size]

    # The epochs run to the end of int64: endless in practice.
    return tf.data.Dataset.range(first, np.iinfo(np.int64).max).map(order_of).unbatch()


def _batched_stream(keys, labels, batch_size, epochs, fetch=None, fetch_batch=None):
    """positions -> fetch -> batch, or positions -> batch -> fetch (in memory, cache)."""
    dataset = _positions(len(labels), epochs, batch_size)
    # Keys and labels stay in one tensor each, gathered by position: the stream holds
    # integers, never a path's string or a decoded image, until the fetch.
    keys, labels = tf.constant(keys), tf.constant(labels.astype(np.int32))
    if fetch is not None:
        # Read and decode one file per position, in parallel, after the order is
        # drawn: only the images in flight are in memory.
        dataset = dataset.map(
            lambda position: (fetch(tf.gather(keys, position)), tf.gather(labels, position)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    # drop_remainder in training gives a static batch dimension, so a compiled (XLA)
    # step is built once; an epoch is whole batches, so none straddles two epochs.
    dataset = dataset.batch(batch_size, drop_remainder=epochs is not None)
    if fetch is None:
        # In-memory rows and the decoded cache are read a batch of positions at a
        # time: a tf.data element per image cost more than the read itself (stores).
        # Gathers from memory keep their order whatever the options, so features
        # and in-memory images stream the same batches.
        read = fetch_batch or tf.identity
        dataset = dataset.map(
            lambda positions: (read(tf.gather(keys, positions)), tf.gather(labels, positions)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True if fetch_batch is None else None,
        )
    return dataset


def _serve(dataset, is_training, options, data_service=None):
    """-> tf.data service (optional) -> prefetch, with the run's tf.data options."""
    if not is_training:
        # One pass in the split's order (predictions are matched to labels by place):
        # parallel reads and decodes must not reorder it.
        options = dataclasses.replace(options, deterministic=True)
    if data_service is not None:
        # The service's workers run everything above; distributed_epoch hands them
        # splits of the source (whole epochs in training), so each example is still
        # served once per epoch, however many workers, in the service's own order.
        distribute = tf.data.experimental.service.distribute(
            "distributed_epoch", data_service.address, job_name=data_service.job_name
        )
        dataset = dataset.apply(distribute)
    # Prefetch last: the host prepares the next batch while the device computes.
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(tf_data_options(options))


def tf_data_options(options: PipelineOptions) -> tf.data.Options:
    """The tf.data options of the knobs (benchmarks give other loaders the same)."""
    tf_options = tf.data.Options()
    tf_options.deterministic = options.deterministic
    tf_options.autotune.enabled = options.autotune
    if options.threads:
        tf_options.threading.private_threadpool_size = options.threads
    return tf_options


def pipeline_options_of(runtime: RuntimeConfig) -> PipelineOptions:
    """The input pipeline's knobs from the run's runtime slice (trainer and benchmarks)."""
    return PipelineOptions(runtime.deterministic, runtime.autotune, runtime.data_threads)
