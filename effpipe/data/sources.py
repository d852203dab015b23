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

import dataclasses

import numpy as np

from effpipe import network
from effpipe.config import DataConfig
from effpipe.data import cache, cifar100_names, folders, shapes, stores, tfds_source
from effpipe.data.splits import DataSource
from effpipe.errors import UsageError

# The host tensorflow-datasets downloads CIFAR-100 from. Only used to fail fast
# (seconds instead of minutes of retries) when there is no network.
CIFAR100_DOWNLOAD_HOST = "www.cs.toronto.edu"


def load_configured_source(
    data: DataConfig, *, size: int, seed: int, cache_root: str, workers: tuple[int, int] = (1, 0)
) -> DataSource:
    """Loads the run's source, its images decoded into the cache (trainer, evaluation,
    benchmarks).

    Args:
      data: the run's data slice.
      size: side in pixels images are stored at (`TrainConfig.source_size`).
      seed: seeds the shapes dataset's draws.
      cache_root: the folder of disk caches (--cache_dir, or WORKDIR/cache/images).
      workers: (count, index) of the run's workers, which share the first pass of a
        disk cache under a shared --cache_dir (effpipe.data.cache).

    Returns:
      The loaded DataSource.

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
    options = dict(
        crop=data.source_crop,
        mode=data.cache,
        cache_root=cache_root,
        memory_budget_mb=data.cache_memory_mb,
        on_bad_image=data.on_bad_image,
        workers=workers,
    )
    if dataset.startswith("folder:"):
        return load_folder(dataset.removeprefix("folder:"), size=size, **options)
    name = "cifar100" if dataset == "cifar100" else dataset.removeprefix("tfds:")
    if not dataset.startswith("tfds:") and dataset != "cifar100":
        raise UsageError(f"unknown dataset {dataset!r}: choose cifar100, tfds:NAME, folder:PATH")
    source = load_tfds(
        name,
        data_dir=data.data_dir,
        size=size,
        keep_native_size=data.source_size == 0,
        **options,
    )
    if dataset == "cifar100":
        # A builder not prepared from the real files (tfds.testing.mock_data) only
        # knows placeholder names "0".."99".
        if source.class_names == tuple(str(index) for index in range(100)):
            source = dataclasses.replace(source, class_names=cifar100_names.FINE_LABEL_NAMES)
        source = dataclasses.replace(source, name="cifar100")
    return source


def load_folder(path: str, *, size: int, **options) -> DataSource:
    """A folder's images, decoded into the cache (`effpipe.data.cache.materialize`).

    Args:
      path: the dataset folder.
      size: side in pixels images are stored at.
      **options: crop, mode, cache_root, memory_budget_mb, on_bad_image, workers.

    Raises:
      UsageError: see `folders.list_folder` and `cache.materialize`.
    """
    import tensorflow as tf

    class_names, train, test = folders.list_folder(path)
    loaded, skipped = {}, ()
    for name, listed in (("train", train), ("test", test)):
        if listed is None:
            continue

        def make_records(listed=listed):
            return tf.data.Dataset.from_tensor_slices(
                (stores.path_bytes(listed.paths), listed.labels)
            )

        encoded = cache.EncodedSplit(
            name=f"folder-{name}",
            count=len(listed.paths),
            fingerprint=listed.fingerprint,
            make_records=make_records,
            reads_files=True,
            describe=listed.paths.__getitem__,
            paths=listed.paths,
        )
        loaded[name], split_skipped = cache.materialize(
            encoded, size=size, labels=listed.labels, **options
        )
        skipped += split_skipped
        if name == "train":
            _check_every_class_kept(loaded[name], class_names, listed.directory)
    return DataSource(
        f"folder:{path}", loaded["train"], loaded.get("test"), class_names, skipped=skipped
    )


def _check_every_class_kept(split, class_names, directory) -> None:
    emptied = sorted(set(range(len(class_names))) - set(np.unique(split.labels).tolist()))
    if emptied:
        raise UsageError(
            f"class folder {directory}/{class_names[emptied[0]]} has no image that can be "
            "decoded: replace the files or remove the folder"
        )


def load_tfds(name: str, *, data_dir: str | None, size: int, keep_native_size: bool, **options):
    """A tensorflow-datasets dataset's splits, decoded into the cache.

    Args:
      name: NAME[/CONFIG][@VERSION].
      data_dir: the tensorflow-datasets data directory.
      size: side in pixels images are stored at.
      keep_native_size: store the dataset's own size when all its images share one
        smaller than `size` (CIFAR-100 at 32 px).
      **options: crop, mode, cache_root, memory_budget_mb, on_bad_image, workers.

    Raises:
      UsageError: an unknown or unprepared dataset, no image or label feature.
    """
    dataset = tfds_source.open_dataset(name, data_dir, reachable=_host_reachable)
    native = dataset.native_size
    if keep_native_size and native and native < size:
        size = native
    loaded, skipped = {}, ()
    for split_name, encoded in dataset.encoded_splits().items():
        loaded[split_name], split_skipped = cache.materialize(encoded, size=size, **options)
        skipped += split_skipped
    return DataSource(
        f"tfds:{name}",
        loaded["train"],
        loaded.get("test"),
        dataset.class_names,
        validation=loaded.get("validation"),
        skipped=skipped,
    )


def _host_reachable(host: str, port: int = 443, timeout_sec: float = 10.0) -> bool:
    return network.connection_error(host, port, timeout_sec) is None
