"""Data sources: uint8 images at source resolution, integer labels, metadata.

Every source returns a `DataSource` of in-memory numpy arrays (N, H, W, 3) uint8
and (N,) int32 labels. Images stay small and uint8 on the host: resizing to the
model resolution happens on the device, inside the compiled step.

Sources:
  cifar100     CIFAR-100 fine labels through tensorflow-datasets (`data_dir`).
  folder:PATH  PATH/train/<class>/*.png|jpg|jpeg and optional PATH/test/<class>/.
  shapes       the synthetic shapes (`effpipe.data.shapes`).
"""

import os
import socket

import numpy as np
from absl import logging

from effpipe.config import DataConfig
from effpipe.data import cifar100_names, shapes
from effpipe.data.splits import DataSource, Split
from effpipe.errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# The host tensorflow-datasets downloads CIFAR-100 from. Only used to fail fast
# (seconds instead of minutes of retries) when there is no network.
CIFAR100_DOWNLOAD_HOST = "www.cs.toronto.edu"


def load_configured_source(data: DataConfig, *, seed: int) -> DataSource:
    """`load_source` with a run's data slice (trainer, evaluation and benchmarks).

    Args:
      data: the run's data slice.
      seed: seeds the shapes dataset's draws.

    Returns:
      The loaded DataSource.

    Raises:
      UsageError: see `load_source`.
    """
    return load_source(
        data.dataset,
        data_dir=data.data_dir,
        source_size=data.source_size,
        seed=seed,
        shapes_num_classes=data.shapes_num_classes,
        shapes_train_examples=data.shapes_train_examples,
        shapes_test_examples=data.shapes_test_examples,
        on_bad_image=data.on_bad_image,
    )


def load_source(
    dataset: str,
    *,
    data_dir: str | None = None,
    source_size: int = 32,
    seed: int = 0,
    shapes_num_classes: int = 10,
    shapes_train_examples: int = 3000,
    shapes_test_examples: int = 600,
    on_bad_image: str = "fail",
) -> DataSource:
    """Loads the source named by a `--dataset` value.

    Args:
      dataset: "cifar100", "shapes" or "folder:PATH".
      data_dir: tensorflow-datasets data directory (cifar100 only).
      source_size: side in pixels that folder and shapes images are stored at.
      seed: seeds the shapes generator.
      shapes_num_classes: number of shape kinds (2..10).
      shapes_train_examples: size of the generated train split.
      shapes_test_examples: size of the generated test split.
      on_bad_image: "fail" or "skip" for folder images that cannot be decoded.

    Returns:
      The loaded DataSource.

    Raises:
      UsageError: unknown dataset, or data that cannot be found or read.
    """
    if dataset == "cifar100":
        return load_cifar100(data_dir)
    if dataset == "shapes":
        return shapes.make_shapes_source(
            num_classes=shapes_num_classes,
            train_examples=shapes_train_examples,
            test_examples=shapes_test_examples,
            image_size=source_size,
            seed=seed,
        )
    if dataset.startswith("folder:"):
        return load_folder(
            dataset[len("folder:") :], source_size=source_size, on_bad_image=on_bad_image
        )
    raise UsageError(f"unknown dataset {dataset!r}: choose cifar100, shapes or folder:PATH")


def load_cifar100(data_dir: str | None) -> DataSource:
    """CIFAR-100 with fine labels through tensorflow-datasets.

    Downloads and prepares the dataset under `data_dir` on first use. Without
    network and without prepared data, raises a UsageError saying how to prepare it.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar100", data_dir=data_dir)
    location = data_dir or "~/tensorflow_datasets"
    if not builder.is_prepared():
        if not _host_reachable(CIFAR100_DOWNLOAD_HOST):
            raise UsageError(
                f"CIFAR-100 is not prepared under {location} and there is no network to "
                'download it: run `python -c "import tensorflow_datasets as tfds; '
                "tfds.builder('cifar100').download_and_prepare()\"` on a machine with "
                "network and copy ~/tensorflow_datasets here, or point --data_dir at a "
                "prepared copy"
            )
        try:
            builder.download_and_prepare()
        except Exception as error:  # tfds raises many types; all mean the same here.
            raise UsageError(
                f"CIFAR-100 could not be downloaded into {location} "
                f"({type(error).__name__}: {error}): point --data_dir at a prepared copy"
            ) from error
    splits = {}
    for split_name in ("train", "test"):
        dataset = builder.as_dataset(split=split_name, as_supervised=True)
        images, labels = [], []
        for image_batch, label_batch in tfds.as_numpy(dataset.batch(4096)):
            images.append(image_batch)
            labels.append(label_batch)
        splits[split_name] = Split(
            np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)
        )
    names = tuple(builder.info.features["label"].names)
    # A builder that has not been prepared from the real files (for example under
    # tfds.testing.mock_data) only knows placeholder names "0".."99".
    if names == tuple(str(index) for index in range(100)):
        names = cifar100_names.FINE_LABEL_NAMES
    return DataSource("cifar100", splits["train"], splits["test"], names)


def _host_reachable(host: str, port: int = 443, timeout_sec: float = 10.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_sec):
            return True
    except OSError:
        return False


def load_folder(path: str, *, source_size: int, on_bad_image: str = "fail") -> DataSource:
    """Images from PATH/train/<class>/ and optional PATH/test/<class>/.

    Each image is decoded once on the host (grayscale, palette and RGBA images are
    converted to RGB) and resized to `source_size` x `source_size`.

    Args:
      path: the dataset folder.
      source_size: side in pixels the images are stored at.
      on_bad_image: "fail" stops at the first file that cannot be decoded, naming
        it; "skip" leaves such files out and logs how many (and the first).

    Raises:
      UsageError: a missing or empty folder, an empty class, a bad image with "fail".
    """
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(path):
        raise UsageError(f"dataset folder {path} does not exist: check --dataset=folder:PATH")
    if not os.path.isdir(train_dir):
        raise UsageError(
            f"dataset folder {path} has no train/ subfolder: lay it out as "
            "PATH/train/<class>/*.png|jpg|jpeg"
        )
    class_names = tuple(
        sorted(
            entry
            for entry in os.listdir(train_dir)
            if os.path.isdir(os.path.join(train_dir, entry))
        )
    )
    if not class_names:
        raise UsageError(f"{train_dir} has no class folders: add PATH/train/<class>/ folders")
    train = _load_folder_split(train_dir, class_names, source_size, on_bad_image, is_train=True)
    test_dir = os.path.join(path, "test")
    test = None
    if os.path.isdir(test_dir):
        test = _load_folder_split(test_dir, class_names, source_size, on_bad_image, is_train=False)
    return DataSource(f"folder:{path}", train, test, class_names)


def _load_folder_split(
    directory: str,
    class_names: tuple[str, ...],
    source_size: int,
    on_bad_image: str,
    *,
    is_train: bool,
) -> Split:
    unknown = sorted(
        entry
        for entry in os.listdir(directory)
        if os.path.isdir(os.path.join(directory, entry)) and entry not in class_names
    )
    if unknown:
        raise UsageError(f"{directory} has class folders that train/ lacks: {', '.join(unknown)}")
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(directory, class_name)
        if not os.path.isdir(class_dir):
            continue
        files = sorted(
            name for name in os.listdir(class_dir) if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files and is_train:
            raise UsageError(
                f"class folder {class_dir} has no .png/.jpg/.jpeg images: add some or remove it"
            )
        paths.extend(os.path.join(class_dir, name) for name in files)
        labels.extend([label] * len(files))
    if not paths:
        raise UsageError(f"{directory} holds no .png/.jpg/.jpeg images: add some or remove it")
    images, kept_labels, skipped = [], [], []
    for path, label in zip(_progress(paths), labels):
        try:
            images.append(_decode_image(path, source_size))
            kept_labels.append(label)
        except UsageError:
            if on_bad_image != "skip":
                raise
            skipped.append(path)
    if skipped:
        logging.warning(
            "skipped %d of %d images in %s that cannot be decoded (--on_bad_image=skip), first %s",
            len(skipped),
            len(paths),
            directory,
            skipped[0],
        )
    if not images:
        raise UsageError(f"no image in {directory} can be decoded: replace the files")
    if is_train:
        emptied = sorted(set(range(len(class_names))) - set(kept_labels))
        if emptied:
            raise UsageError(
                f"class folder {os.path.join(directory, class_names[emptied[0]])} has no "
                "image that can be decoded: replace the files or remove the folder"
            )
    return Split(np.stack(images), np.asarray(kept_labels, dtype=np.int32))


def _decode_image(path: str, source_size: int) -> np.ndarray:
    import tensorflow as tf

    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        raise UsageError(
            f"cannot decode image {path}: delete or replace the file, or pass --on_bad_image=skip"
        ) from error
    return resize_to_source(image, source_size).numpy()


def resize_to_source(images, source_size: int):
    """Images (or one image) of any size to `source_size` px uint8, as stored on the host.

    The folder loader and the exported model's serving signatures share it, so a
    served image reaches the model as a training image did. Antialiased: shrinking
    a large photo to 32 px must average, not alias.
    """
    import tensorflow as tf

    resized = tf.image.resize(images, (source_size, source_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _progress(paths: list[str]):
    """Yields paths, showing a Keras progress bar when there are many."""
    if len(paths) < 2000:
        yield from paths
        return
    import keras

    bar = keras.utils.Progbar(len(paths), unit_name="image")
    for index, path in enumerate(paths):
        yield path
        bar.update(index + 1)
