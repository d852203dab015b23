"""The one place where a tf.distribute strategy enters the trainer.

    --strategy=auto          mirrored when more than one GPU is visible, else default
    --strategy=default       one device (TensorFlow's default strategy)
    --strategy=mirrored      every local GPU (without GPUs: the logical CPU devices)
    --strategy=multi_worker  the machines of TF_CONFIG, each with its local GPUs
    --strategy=tpu           the TPU of $TPU_NAME, or a local one

`resolve` creates the strategy (first: collective ops must be configured before
TensorFlow initialises its devices) and says why, like `runtime`. The trainer
builds, compiles, restores and fits the model inside `strategy.scope()`; the
training stream comes from `distribute_training_stream`, which hands each worker
its own shard of the examples at the per-replica batch. `--batch_size` is the
global batch: every step trains on that many images over all replicas together.
"""

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from effpipe.errors import UsageError
from effpipe.training import cluster


@dataclasses.dataclass(frozen=True)
class Distribution:
    """The resolved strategy of a run and this process's part in it.

    Attributes:
      strategy: the tf.distribute strategy (the default strategy for one device).
      kind: "default", "mirrored", "multi_worker" or "tpu".
      num_replicas: replicas over all workers; --batch_size divides by it.
      num_workers: processes that train together (1 but for multi_worker).
      worker_index: this process's input pipeline, 0..num_workers-1.
      is_chief: whether this process writes the run's outputs.
      reasons: one sentence per decision, for the log.
    """

    strategy: tf.distribute.Strategy
    kind: str
    num_replicas: int
    num_workers: int
    worker_index: int
    is_chief: bool
    reasons: tuple[str, ...]

    @property
    def is_distributed(self) -> bool:
        return self.kind != "default"


def check_global_batch(batch_size: int, num_replicas: int, where: str) -> int:
    """The per-replica batch of a global `batch_size`.

    Raises:
      UsageError: the global batch does not divide by the replicas.
    """
    if batch_size % num_replicas:
        lower, higher = (
            (batch_size // num_replicas) * num_replicas,
            (batch_size // num_replicas + 1) * num_replicas,
        )
        raise UsageError(
            f"--batch_size={batch_size} is the global batch and must divide by the "
            f"{num_replicas} replicas of {where}: use {higher}" + (f" or {lower}" if lower else "")
        )
    return batch_size // num_replicas


def resolve(kind: str, batch_size: int) -> Distribution:
    """Creates the strategy of `--strategy=kind`; call before any other TensorFlow work.

    Args:
      kind: the --strategy flag.
      batch_size: the global batch, checked against the replicas.

    Returns:
      The Distribution, with its reasons for the log.

    Raises:
      UsageError: the batch does not divide by the replicas, TF_CONFIG is missing
        for multi_worker, or no TPU answers for tpu.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "auto":
        kind = "mirrored" if len(gpus) > 1 else "default"
        reason = f"strategy {kind} (--strategy=auto with {len(gpus)} GPU(s))"
    else:
        reason = f"strategy {kind} (--strategy={kind})"
    task = cluster.current_task(kind)
    if kind == "default":
        strategy = tf.distribute.get_strategy()
    elif kind == "mirrored":
        # Without GPUs MirroredStrategy would take one CPU; logical CPU devices (set
        # before TensorFlow starts, as the tests do) make real replicas on a CPU.
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif kind == "multi_worker":
        # Known before connecting: each worker trains on its local GPUs (or one CPU),
        # so a batch that cannot divide fails here rather than after the cluster forms.
        check_global_batch(
            batch_size, task.num_workers * max(len(gpus), 1), f"{task.num_workers} workers"
        )
        _fix_keras_multi_worker_metrics()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = _make_tpu_strategy()
    num_replicas = strategy.num_replicas_in_sync
    check_global_batch(batch_size, num_replicas, f"--strategy={kind}")
    reasons = (
        f"{reason}: {num_replicas} replica(s) over {task.num_workers} worker(s), "
        f"{batch_size // num_replicas} images per replica per step",
    )
    return Distribution(
        strategy, kind, num_replicas, task.num_workers, task.index, task.is_chief, reasons
    )


def _make_tpu_strategy() -> tf.distribute.TPUStrategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        raise UsageError(
            f"--strategy=tpu found no TPU ({error}): set TPU_NAME, or use --strategy=auto"
        ) from error
    return tf.distribute.TPUStrategy(resolver)


def distribute_training_stream(
    distribution: Distribution,
    batch_size: int,
    make_stream: Callable[[int, tuple[int, int]], tf.data.Dataset],
):
    """The training stream of the run: every worker's own shard, per-replica batches.

    Args:
      distribution: the run's Distribution.
      batch_size: the global batch.
      make_stream: (batch size, (shard count, shard index)) -> the endless stream
        of that shard at that batch size, from the epoch the run resumes at.

    Returns:
      A dataset (one device) or a distributed dataset for `fit`: each step gives
      each replica one batch of batch_size / num_replicas.
    """
    if not distribution.is_distributed:
        return make_stream(batch_size, (1, 0))

    def stream_of(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # One input pipeline per worker: a shard of the examples (disjoint from the
        # other workers') with its own shuffle order, batched per replica; the local
        # replicas take consecutive batches.
        return make_stream(
            context.get_per_replica_batch_size(batch_size),
            (context.num_input_pipelines, context.input_pipeline_id),
        )

    return distribution.strategy.distribute_datasets_from_function(stream_of)


def use_strategy_of_scope(model: keras.Model) -> None:
    """Lets `model` run under the strategy of the enclosing `strategy.scope()`.

    A model built inside a scope remembers its strategy, and Keras 3.15's `fit`
    then draws one batch to build the model symbolically: under
    MultiWorkerMirroredStrategy that reduces the batch's (images, labels) tuple
    and fails (keras-team/keras#20585), and under MirroredStrategy it restarts the
    stream, whose next shuffle order then differs from one device's. Forgotten,
    the strategy comes from the scope `fit` runs in (`distribute_strategy` falls
    back to `tf.distribute.get_strategy()`); the trainer builds the optimizer
    itself, in the scope.
    """
    model._distribute_strategy = None


def _fix_keras_multi_worker_metrics() -> None:
    """Keras 3.15 averages a step's logs over workers with axis=0, which fails for
    scalars under MultiWorkerMirroredStrategy; average them element-wise instead
    (what Keras does for the replicas of one worker)."""
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "effpipe_fix", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.effpipe_fix = True
    trainer.reduce_per_replica = reduce_per_replica


def check_same_on_every_worker(distribution: Distribution, values: list[int], what: str):
    """Raises UsageError unless every worker passes the same `values`.

    Workers that resumed from different epochs would train different step counts
    and wait for each other forever; this all-gather finds it first.
    """
    if distribution.num_workers == 1:
        return
    strategy = distribution.strategy
    local = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([values], tf.int64)
    )
    gathered = np.asarray(strategy.gather(local, axis=0))
    if not (gathered == gathered[0]).all():
        raise UsageError(
            f"the workers disagree on {what} ({gathered.tolist()}): every worker reads the "
            "run directory's state, so --workdir must be on a filesystem they all share"
        )
    logging.info("every worker agrees on %s: %s", what, values)
