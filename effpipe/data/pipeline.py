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
at 456 px float32 2.5 MB): the cast, augmentation and resize run on the device,
inside the compiled step. This module imports nothing from the model.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from effpipe.config import RuntimeConfig
from effpipe.data import splits, stores


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the chain that do not change what it yields.

    Attributes:
      deterministic: keep element order fixed run to run (slower parallel stages).
      autotune: let tf.data tune parallelism and buffer sizes.
      threads: size of a private thread pool for the pipeline; 0 uses the shared one.
    """

    deterministic: bool = False
    autotune: bool = True
    threads: int = 0


@dataclasses.dataclass(frozen=True)
class DataService:
    """A tf.data service that runs the chain on its workers instead of this process.

    Attributes:
      address: grpc://HOST:PORT of the dispatcher.
      job_name: consumers naming the same job share its stream, each element going to
        one of them (the workers of a multi-worker run); a new name starts a new job.
    """

    address: str
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
    """Builds the batched dataset of (uint8 images, int32 labels).

    Args:
      split: the examples (`effpipe.data.splits.Split`), or their images in memory,
        (N, H, W, 3) uint8 at source resolution.
      labels: (N,) class ids, with images given as an array.
      batch_size: examples per batch (the per-replica batch under a strategy).
      is_training: an endless stream of epochs, each in its own order and of
        `batches_per_epoch` full batches; else one pass in order, its last batch
        partial.
      seed: seeds the epochs' orders.
      initial_epoch: the epoch the training stream starts at (a resumed run's).
      batches_per_epoch: batches of one training epoch (fit's steps_per_epoch times
        the batches each step takes); by default every full batch of the examples.
      options: pipeline knobs that do not change the elements.
      data_service: run the chain on a tf.data service's workers.

    Returns:
      A dataset of (images (B, H, W, 3) uint8, labels (B,) int32); in training B is
      static.

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
        _Epochs(seed, initial_epoch, batches_per_epoch) if is_training else None,
        fetch=stores.fetch(store) if isinstance(store, stores.FileStore) else None,
        fetch_batch=stores.fetch_batch(store) if isinstance(store, stores.CacheStore) else None,
        skip_bad=getattr(store, "skip_bad", False),
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
    """The same chain over per-image feature vectors instead of images.

    An epoch's order comes from the seed, the epoch and the number of examples
    alone, never from their values, so for the same arguments and the same examples
    in the same order this yields the labels `make_dataset` yields, batch for batch:
    phase 1 on cached features sees the batches phase 1 on images would.

    Args:
      features: (N, F) float32, row i computed from image i of the split.
      labels: (N,) integer class ids.
      batch_size, is_training, seed, initial_epoch, batches_per_epoch, options: as
        for `make_dataset`.

    Returns:
      A dataset of (features (B, F) float32, labels (B,) int32).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (examples, size), got shape {features.shape}")
    epochs = _Epochs(seed, initial_epoch, batches_per_epoch) if is_training else None
    return _serve(
        _batched_stream(features, np.asarray(labels), batch_size, epochs), is_training, options
    )


@dataclasses.dataclass(frozen=True)
class _Epochs:
    """Which epochs a training stream yields: from `first` on, each `batches` long."""

    seed: int
    first: int
    batches: int | None


# The training stream's epochs run to the end of int64: endless in practice.
_LAST_EPOCH = np.iinfo(np.int64).max


def _positions(count, epochs, batch_size):
    """The stream of positions: one pass in order, or the epochs' orders, endless."""
    positions = np.arange(count, dtype=np.int64)
    if epochs is None:
        return tf.data.Dataset.from_tensor_slices(positions)
    batches = count // batch_size if epochs.batches is None else epochs.batches
    if not 0 < batches * batch_size <= count:
        raise ValueError(
            f"an epoch of {batches} batches of {batch_size} needs more than the "
            f"{count} examples: lower the batch size"
        )
    seed, positions = tf.constant(epochs.seed, tf.int64), tf.constant(positions)

    def order_of(epoch):
        # Epoch e's order depends on (seed, e) alone: a stream that starts at epoch k
        # draws k's order without producing the epochs before. It holds exactly the
        # batches fit takes in one epoch, so epochs stay aligned with fit's.
        order = tf.random.experimental.stateless_shuffle(positions, seed=tf.stack([seed, epoch]))
        return order[: batches * batch_size]

    return tf.data.Dataset.range(epochs.first, _LAST_EPOCH).map(order_of).unbatch()


def _batched_stream(keys, labels, batch_size, epochs, fetch=None, fetch_batch=None, skip_bad=False):
    """positions -> fetch -> batch, or positions -> batch -> fetch (in memory, cache)."""
    is_training = epochs is not None
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
        if skip_bad:
            # --cache=off with --on_bad_image=skip: a file that does not decode drops out.
            dataset = dataset.ignore_errors()
    # drop_remainder in training gives a static batch dimension, so a compiled (XLA)
    # step is built once; an epoch is whole batches, so none straddles two epochs
    # (unless --on_bad_image=skip drops a file).
    dataset = dataset.batch(batch_size, drop_remainder=is_training)
    if fetch is None:
        # In-memory rows and the decoded cache are read a batch of positions at a
        # time: a tf.data element per image cost more than the read itself (stores).
        # Gathers from memory keep their order whatever the options, so features
        # and in-memory images stream the same batches.
        dataset = dataset.map(
            lambda positions: (
                (fetch_batch or tf.identity)(tf.gather(keys, positions)),
                tf.gather(labels, positions),
            ),
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
        # The service's workers run everything above. distributed_epoch hands each
        # of them splits of the source (whole epochs in training), so every example
        # is still served once per epoch whatever the number of service workers;
        # their interleaving is the service's own order.
        dataset = dataset.apply(
            tf.data.experimental.service.distribute(
                processing_mode="distributed_epoch",
                service=data_service.address,
                job_name=data_service.job_name,
            )
        )
    # Prefetch last: the host prepares the next batch while the device computes.
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    return dataset.with_options(tf_data_options(options))


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
    return PipelineOptions(
        deterministic=runtime.deterministic, autotune=runtime.autotune, threads=runtime.data_threads
    )
