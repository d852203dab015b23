"""Data sources: encoded files or records, decoded once into the cache, as Splits.

    cifar100                      CIFAR-100 fine labels (tensorflow-datasets), 32 px
    tfds:NAME[/CONFIG][@VERSION]  any tensorflow-datasets image-classification dataset
                                  with an Image and a ClassLabel feature
    folder:PATH                   PATH/train/<class>/ and optional PATH/test/<class>/
    shapes                        the synthetic shapes (`effpipe.data.shapes`), in memory

A file-backed source never holds its encoded or decoded images in memory as a whole:
its splits are listed (paths, or tfds records read in order with the image left
encoded), decoded in a parallel tf.data map and kept by `effpipe.data.cache` in
memory or on disk as --cache says. Resizing to the model resolution happens later,
on the device.
"""

import os

import numpy as np

from effpipe import network
from effpipe.config import DataConfig
from effpipe.data import cache, cifar100_names, folders, shapes, splits, stores, tfds_source
from effpipe.data.splits import DataSource
from effpipe.errors import UsageError


def load_configured_source(
    data: DataConfig, *, size: int, seed: int, cache_root: str, workers: tuple[int, int] = (1, 0)
) -> DataSource:
    """Loads the run's source, its images decoded into the cache (trainer, evaluation,
    benchmarks).

    Args:
      data: the run's data slice.
      size: side in pixels images are stored at (`TrainConfig.source_size`).
      seed: seeds the shapes dataset's draws and the validation split.
      cache_root: the folder of disk caches (--cache_dir, or WORKDIR/cache/images).
      workers: (count, index) of the run's workers. With several, this worker decodes
        only its own share (`worker_share`) into a folder of its own: workers share
        no cache.

    Returns:
      The loaded DataSource; a worker's `train` is its shard, and its `validation`
      the run's validation split.

    Raises:
      UsageError: unknown dataset, or data that cannot be found or read.
    """
    dataset = data.dataset
    if dataset == "shapes":
        return shapes.make_shapes_source(
            num_classes=data.shapes_num_classes,
            train_examples=data.shapes_train_examples,
            test_examples=data.shapes_test_examples,
            image_size=size,
            seed=seed,
        )
    if dataset.startswith("folder:"):
        name, class_names, encoded = _list_folder(dataset.removeprefix("folder:"))
    elif dataset == "cifar100" or dataset.startswith("tfds:"):
        name, class_names, encoded, size = _list_tfds(data, size)
    else:
        raise UsageError(f"unknown dataset {dataset!r}: choose cifar100, tfds:NAME, folder:PATH")
    count, index = workers
    if count > 1:
        encoded = worker_share(encoded, data, seed=seed, workers=workers)
        cache_root = os.path.join(cache_root, f"worker-{index}-of-{count}")
    loaded, skipped = {}, ()
    for split_name, split in encoded.items():
        loaded[split_name], split_skipped = cache.materialize(
            split,
            size=size,
            crop=data.source_crop,
            mode=data.cache,
            cache_root=cache_root,
            memory_budget_mb=data.cache_memory_mb,
            on_bad_image=data.on_bad_image,
        )
        skipped += split_skipped
    if dataset.startswith("folder:") and count == 1:
        train_dir = os.path.join(dataset.removeprefix("folder:"), "train")
        _check_every_class_kept(loaded["train"], class_names, train_dir)
    return DataSource(
        name,
        loaded["train"],
        loaded.get("test"),
        class_names,
        validation=loaded.get("validation"),
        skipped=skipped,
    )


def worker_share(encoded: dict, data: DataConfig, *, seed: int, workers: tuple[int, int]) -> dict:
    """A worker's encoded splits: its equal shard of the training images, the run's
    validation split (carved off train as `splits.configured_splits` carves it) and
    the test split, each decoded by this worker alone.

    The shard is the one the input pipeline would take (`pipeline.make_dataset`'s
    `shard`): every `count`-th training image from the `index`-th, the last
    len % count left out, so every worker runs the same number of steps.
    """
    count, index = workers
    train = encoded["train"]
    if "validation" in encoded:
        train_positions = np.arange(train.count)
        validation = encoded["validation"]
    else:
        train_positions, validation_positions = splits.validation_positions(
            train.count, data.validation_fraction, seed=seed, selection=data.validation_selection
        )
        validation = train.subset(validation_positions, f"{train.name}-validation")
    shard_size = len(train_positions) // count
    shard = train_positions[: shard_size * count][index::count]
    shared = dict(encoded, train=train.subset(shard, f"{train.name}-shard{index}of{count}"))
    shared["validation"] = validation
    return shared


def _list_folder(path: str):
    """(name, class names, {split: EncodedSplit}) of a folder of images."""
    import tensorflow as tf

    class_names, train, test = folders.list_folder(path)
    encoded = {}
    for split_name, listed in (("train", train), ("test", test)):
        if listed is None:
            continue

        def make_records(listed=listed):
            return tf.data.Dataset.from_tensor_slices(
                (stores.path_bytes(listed.paths), listed.labels)
            )

        encoded[split_name] = cache.EncodedSplit(
            name=f"folder-{split_name}",
            count=len(listed.paths),
            fingerprint=listed.fingerprint,
            make_records=make_records,
            describe=listed.paths.__getitem__,
            paths=listed.paths,
            labels=listed.labels,
        )
    return f"folder:{path}", class_names, encoded


def _list_tfds(data: DataConfig, size: int):
    """(name, class names, {split: EncodedSplit}, storage size) of a tfds dataset: its
    own size when all its images share one smaller than `size` and --source_size is
    0 (CIFAR-100 at 32 px)."""
    name = "cifar100" if data.dataset == "cifar100" else data.dataset.removeprefix("tfds:")
    dataset = tfds_source.open_dataset(name, data.data_dir, reachable=_host_reachable)
    native = dataset.native_size
    if data.source_size == 0 and native and native < size:
        size = native
    class_names = dataset.class_names
    # A builder not prepared from the real files (tfds.testing.mock_data) only knows
    # placeholder names "0".."99".
    if data.dataset == "cifar100" and class_names == tuple(str(i) for i in range(100)):
        class_names = cifar100_names.FINE_LABEL_NAMES
    source_name = "cifar100" if data.dataset == "cifar100" else f"tfds:{name}"
    return source_name, class_names, dataset.encoded_splits(), size


def _check_every_class_kept(split, class_names, directory) -> None:
    emptied = sorted(set(range(len(class_names))) - set(np.unique(split.labels).tolist()))
    if emptied:
        raise UsageError(
            f"class folder {directory}/{class_names[emptied[0]]} has no image that can be "
            "decoded: replace the files or remove the folder"
        )


def _host_reachable(host: str, port: int = 443, timeout_sec: float = 10.0) -> bool:
    return network.connection_error(host, port, timeout_sec) is None
