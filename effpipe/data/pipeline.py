"""The host input pipeline: one linear tf.data chain from a split to batches.

    keys of the split's images -> shard (workers) -> shuffle (train) -> fetch (read,
    decode) -> batch -> repeat (train) -> tf.data service (optional) -> prefetch

(the decoded cache is fetched after `batch`: a batch of positions, then their rows).

A key is what a split's store addresses an image by (`effpipe.data.stores`): the
image itself when it is in memory, a file's path, a position in the decoded cache.
Sharding and shuffling act on keys, so each worker reads only its own files and a
shuffle buffer holds paths or integers, never decoded photos; every store yields the
same images in the same order for the same seed. The exception is a tfds split with
--cache=off (`stores.RecordStore`): its records are streamed, files shuffled and
sharded by file, encoded records mixed in a buffer sized in MB, in an order of its own.

`make_feature_dataset` runs the same chain over cached per-image features (phase 1
with the feature cache), in the same order.

Images stay uint8 at source resolution on the host (a 32x32x3 CIFAR image is 3 KB;
the same image at 456 px float32 is 2.5 MB). Casting, augmentation and the resize to
the model resolution happen on the device, inside the compiled step. This module
imports nothing from the model.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from effpipe import network
from effpipe.config import RuntimeConfig
from effpipe.data import decode, splits, stores
from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the chain that do not change what it yields.

    Attributes:
      deterministic: keep element order fixed run to run (slower parallel stages).
      autotune: let tf.data tune parallelism and buffer sizes.
      threads: size of a private thread pool for the pipeline; 0 uses the shared one.
      cache: keep in-memory elements in tf.data's cache after the source stage.
    """

    deterministic: bool = False
    autotune: bool = True
    threads: int = 0
    cache: bool = True


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


# How long the trainer waits for a tf.data service's dispatcher to accept a
# connection before it stops: TensorFlow's client would wait for it for ever.
DISPATCHER_TIMEOUT_SEC = 10.0


def check_dispatcher_answers(address: str, timeout_sec: float = DISPATCHER_TIMEOUT_SEC) -> None:
    """Stops in one line unless the dispatcher at `address` accepts a connection.

    TensorFlow's data-service client retries an absent dispatcher without end, and a
    step waiting on it does not end on SIGTERM either; so a trainer asks first.

    Args:
      address: grpc://HOST:PORT of the dispatcher.
      timeout_sec: how long to wait for the connection.

    Raises:
      UsageError: nothing accepts connections there within `timeout_sec`.
    """
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    reason = network.connection_error(host, int(port), timeout_sec)
    if reason is None:
        return
    raise UsageError(
        f"--data_service={address} does not answer ({reason} within {timeout_sec:g} s): start "
        "`python -m effpipe.data_service --port=PORT` on that host, or check the address "
        "and the firewall between here and there"
    )


# How TensorFlow's data-service client reports a dispatcher that restarted without
# its jobs (a NotFoundError at the next step, once the new dispatcher answers).
DISPATCHER_RESTART_MARKER = "Unknown iteration client id"


def dispatcher_restart_message(address: str, error: Exception) -> str | None:
    """The one line for a training step that failed because its dispatcher restarted.

    A dispatcher without a journal (effpipe.data_service without --work_dir) keeps a
    run's jobs in memory only: a restarted one no longer knows them, and the run
    cannot continue in this process. One with --work_dir restores them, and the
    trainer goes on without an error.

    Args:
      address: grpc://HOST:PORT of the dispatcher (--data_service).
      error: what the training step raised.

    Returns:
      The message, without the resume advice; None for any other error.
    """
    if not isinstance(error, tf.errors.NotFoundError) or DISPATCHER_RESTART_MARKER not in str(
        error
    ):
        return None
    return (
        f"the tf.data service at --data_service={address} restarted and lost this run's input jobs"
    )


def make_dataset(
    split: splits.Split | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    options: PipelineOptions = PipelineOptions(),
    shard: tuple[int, int] = (1, 0),
    data_service: DataService | None = None,
) -> tf.data.Dataset:
    """Builds the batched dataset of (uint8 images, int32 labels).

    Args:
      split: the examples (`effpipe.data.splits.Split`), or their images in memory,
        (N, H, W, 3) uint8 at source resolution.
      labels: (N,) class ids, with images given as an array.
      batch_size: examples per batch (the global batch under a strategy).
      is_training: an endless stream of passes, each reshuffled and without its
        last partial batch (the caller sets steps_per_epoch).
      seed: seeds the shuffle orders.
      options: pipeline knobs that do not change the elements.
      shard: (count, index): keep the index-th of `count` equal shards of the
        examples (a worker's share in a multi-worker run), shuffled with the seed
        `seed + index`.
      data_service: run the chain on a tf.data service's workers.

    Returns:
      A dataset of (images (B, H, W, 3) uint8, labels (B,) int32); in training B is
      static.
    """
    if labels is not None:
        split = splits.Split(split, labels)
    if not is_training:
        # One pass in the split's order (predictions are matched to labels by place):
        # parallel reads and decodes must not reorder it.
        options = dataclasses.replace(options, deterministic=True)
    if isinstance(split.store, stores.RecordStore):
        return _record_stream(split, batch_size, is_training, seed, options, shard, data_service)
    store = split.store
    keys = stores.keys(store, split.positions)
    if isinstance(store, stores.ArrayStore) and keys.dtype != np.uint8:
        raise ValueError(f"images must be uint8 at source resolution, got {keys.dtype}")
    fetch = fetch_batch = None
    if isinstance(store, stores.CacheStore):
        fetch_batch = stores.fetch_batch(store, in_process=data_service is None)
    elif not isinstance(store, stores.ArrayStore):
        fetch = stores.fetch(store)
    return _batched_stream(
        keys,
        split.labels,
        batch_size,
        is_training,
        seed,
        options,
        shard,
        data_service,
        fetch=fetch,
        fetch_batch=fetch_batch,
        skip_bad=getattr(store, "skip_bad", False),
    )


def make_feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    options: PipelineOptions = PipelineOptions(),
) -> tf.data.Dataset:
    """The same chain over per-image feature vectors instead of images.

    The shuffle draws its orders from the seed and the number of elements alone,
    never from their values, so for the same `seed` and the same examples in the
    same order this yields the labels `make_dataset` yields, batch for batch: phase
    1 on cached features sees the batches phase 1 on images would.

    Args:
      features: (N, F) float32, row i computed from image i of the split.
      labels: (N,) integer class ids.
      batch_size, is_training, seed, options: as for `make_dataset`.

    Returns:
      A dataset of (features (B, F) float32, labels (B,) int32).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (examples, size), got shape {features.shape}")
    return _batched_stream(features, labels, batch_size, is_training, seed, options)


def _batched_stream(
    elements,
    labels,
    batch_size,
    is_training,
    seed,
    options,
    shard=(1, 0),
    data_service=None,
    fetch=None,
    fetch_batch=None,
    skip_bad=False,
):
    """shard -> shuffle (train) -> fetch -> batch (-> fetch_batch) -> repeat (train)
    -> service -> prefetch."""
    dataset = tf.data.Dataset.from_tensor_slices((elements, labels.astype(np.int32)))
    count, index = shard
    if count > 1:
        # Equal shards (the last len % count examples left out), so every worker runs
        # the same number of steps per pass; a shard before the shuffle gives each
        # worker its own examples and its own order.
        shard_size = len(labels) // count
        dataset = dataset.take(shard_size * count).shard(count, index)
        labels, seed = labels[:shard_size], seed + index
    # In-memory elements are cached as they are; file-backed keys must not be (the
    # decoded images would pile up in memory): their decoded cache is on disk.
    if options.cache and fetch is None and fetch_batch is None:
        dataset = dataset.cache()
    if is_training:
        # A buffer as large as the split is a uniform shuffle, and it holds keys (a
        # path, an integer) or small in-memory images (32x32x3 uint8: 3 KB). Its
        # orders come from the seed and the count alone, so every store gives the same
        # order. Shuffle before repeat: every pass is a new order.
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if fetch is not None:
        # Read (and decode) after the shuffle, in parallel: only the images in flight
        # are in memory.
        dataset = dataset.map(
            lambda key, label: (fetch(key), label), num_parallel_calls=tf.data.AUTOTUNE
        )
        if skip_bad:
            # --cache=off with --on_bad_image=skip: a file that does not decode drops out.
            dataset = dataset.ignore_errors()
    return _batch_and_serve(dataset, batch_size, is_training, data_service, options, fetch_batch)


# The shuffle buffer of a tfds stream (--cache=off), in MB of encoded records: the
# stream's files are shuffled too, so the buffer only mixes records of nearby files.
RECORD_SHUFFLE_MB = 64


def _record_stream(split, batch_size, is_training, seed, options, shard, data_service):
    """tfds records -> shard by file -> shuffle (train) -> decode -> batch -> ...

    The records' files are sharded before anything is read (each worker reads only
    its own files; by record, still before decoding, when there are fewer files than
    workers) and shuffled, and a buffer of encoded records sized in MB shuffles
    within them. The order is not the positions' order the other stores give.
    """
    store = split.store
    count, index = shard
    if count == 1 or store.num_files >= count:
        records = store.read(seed + index if is_training else None, shard)
    else:
        # Fewer files than workers: each reads them all and keeps the records whose
        # position is its own (positions, not arrival order, which parallel reads vary).
        records = store.read(None, (1, 0)).filter(
            lambda position, encoded, label: position % count == index
        )
    if len(split) < store.count:
        # A carved split (validation off train): the other records are not decoded.
        records = records.filter(stores.keep_positions(store, split.positions))
    if is_training:
        buffer = max(1, RECORD_SHUFFLE_MB * 2**20 // max(store.record_bytes, 1))
        records = records.shuffle(buffer, seed=seed + index, reshuffle_each_iteration=True)
    dataset = records.map(
        lambda position, encoded, label: (
            decode.decode_to_size(encoded, store.size, store.crop),
            tf.cast(label, tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if store.skip_bad:
        dataset = dataset.ignore_errors()
    return _batch_and_serve(dataset, batch_size, is_training, data_service, options)


def _batch_and_serve(dataset, batch_size, is_training, data_service, options, fetch_batch=None):
    """batch (-> fetch_batch) -> repeat (train) -> tf.data service (optional) -> prefetch."""
    # drop_remainder in training gives a static batch dimension, so a compiled
    # (XLA) step is built once and every step sees a full batch.
    dataset = dataset.batch(batch_size, drop_remainder=is_training)
    if fetch_batch is not None:
        # The decoded cache is read a batch of positions at a time, in parallel:
        # a tf.data element per image cost more than the read itself (stores).
        dataset = dataset.map(
            lambda positions, labels: (fetch_batch(positions), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if is_training:
        # Endless: an epoch is fit's steps_per_epoch = len // batch_size steps. The
        # pass orders come from this dataset object's own seed sequence, so a fresh
        # dataset from the same seed always yields the same stream; a resumed run
        # builds one and skips the epochs already trained.
        dataset = dataset.repeat()
    if data_service is not None:
        # The service's workers run everything above. distributed_epoch hands each
        # of them splits of the source, so every example is still served once per
        # pass whatever the number of service workers.
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
