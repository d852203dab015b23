"""Data sources: encoded files or records, decoded once into the cache, as Splits.

    cifar100                      CIFAR-100 fine labels (tensorflow-datasets), 32 px
    tfds:NAME[/CONFIG][@VERSION]  a tensorflow-datasets dataset with Image and ClassLabel features
    folder:PATH                   PATH/train/<class>/ and optional PATH/test/<class>/
    shapes                        the synthetic shapes (`effpipe.data.shapes`), in memory

File-backed sources are listed, never held whole in memory, and decoded once by
`effpipe.data.cache`; resizing to the model resolution happens later, on the device.
"""

import os

import numpy as np
import tensorflow as tf

from effpipe import network
from effpipe.config import DataConfig
from effpipe.data import cache, cifar100_names, folders, shapes, splits, stores, tfds_source
from effpipe.data.splits import DataSource
from effpipe.errors import UsageError


def load_configured_source(
    data: DataConfig, *, size: int, seed: int, cache_root: str, workers: tuple[int, int] = (1, 0)
) -> DataSource:
    """Loads the run's source, its images decoded into the cache.

    Args:
      size: side in pixels images are stored at (`TrainConfig.source_size`).
      seed: seeds the shapes dataset's draws and the validation split.
      cache_root: the folder of disk caches (--cache_dir, or WORKDIR/cache/images).
      workers: (count, index). With several, this worker decodes only its share
        (`worker_share`: `train` is its shard) into a cache folder of its own.

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
        class_names, encoded = _list_folder(dataset.removeprefix("folder:"))
    elif dataset == "cifar100" or dataset.startswith("tfds:"):
        class_names, encoded, size = _list_tfds(data, size)
    else:
        raise UsageError(f"unknown dataset {dataset!r}: choose cifar100, tfds:NAME, folder:PATH")
    count, index = workers
    if count > 1:
        encoded = worker_share(encoded, data, seed=seed, workers=workers)
        cache_root = os.path.join(cache_root, f"worker-{index}-of-{count}")
    options = dict(crop=data.source_crop, mode=data.cache, on_bad_image=data.on_bad_image)
    options.update(cache_root=cache_root, memory_budget_mb=data.cache_memory_mb)
    loaded, skipped = {}, ()
    for split_name, split in encoded.items():
        loaded[split_name], split_skipped = cache.materialize(split, size=size, **options)
        skipped += split_skipped
    if dataset.startswith("folder:") and count == 1:
        kept = set(np.unique(loaded["train"].labels).tolist())
        emptied = sorted(set(range(len(class_names))) - kept)
        if emptied:
            directory = os.path.join(dataset.removeprefix("folder:"), "train")
            raise UsageError(
                f"class folder {directory}/{class_names[emptied[0]]} has no image that can be "
                "decoded: replace the files or remove the folder"
            )
    return DataSource(
        dataset, loaded["train"], loaded.get("test"), class_names, loaded.get("validation"), skipped
    )


def worker_share(encoded: dict, data: DataConfig, *, seed: int, workers: tuple[int, int]) -> dict:
    """A worker's encoded splits: the run's validation and test, and the shard of train
    `pipeline.make_dataset` takes: every `count`-th image from the `index`-th, the last
    len % count left out so every worker runs as many steps."""
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
    shard = train_positions[: len(train_positions) // count * count][index::count]
    shard_name = f"{train.name}-shard{index}of{count}"
    return dict(encoded, train=train.subset(shard, shard_name), validation=validation)


def _list_folder(path: str):
    """(class names, {split: EncodedSplit}) of a folder of images."""
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
    return class_names, encoded


def _list_tfds(data: DataConfig, size: int):
    """(class names, {split: EncodedSplit}, storage size): the dataset's own size when all
    its images share one below `size` and --source_size is 0 (CIFAR-100: 32 px)."""
    name = data.dataset.removeprefix("tfds:")
    dataset = tfds_source.open_dataset(name, data.data_dir, reachable=_host_reachable)
    if data.source_size == 0 and 0 < dataset.native_size < size:
        size = dataset.native_size
    class_names = dataset.class_names
    # A mock builder (tfds.testing.mock_data) knows only placeholder names "0".."99".
    if data.dataset == "cifar100" and class_names == tuple(str(i) for i in range(100)):
        class_names = cifar100_names.FINE_LABEL_NAMES
    return class_names, dataset.encoded_splits(), size


def _host_reachable(host: str, port: int = 443, timeout_sec: float = 10.0) -> bool:
    return network.connection_error(host, port, timeout_sec) is None
