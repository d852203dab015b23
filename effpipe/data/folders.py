"""Listing a folder of images: PATH/train/<class>/ and optional PATH/test/<class>/.

Listed with `os.scandir` and one stat per file (a million files take seconds), sorted so
positions are stable run to run. Hidden entries and files without an image extension
are ignored; contents are checked at decode time (a PNG named .jpg decodes as PNG).
"""

import dataclasses
import hashlib
import os

import numpy as np

from effpipe.errors import UsageError

# Keras' image_dataset_from_directory takes the same extensions.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """A split's image files, sorted by class then name, and their (N,) int32 labels; any
    file added, removed, replaced or touched changes `fingerprint` (paths, sizes, mtimes)."""

    directory: str
    paths: tuple[str, ...]
    labels: np.ndarray
    fingerprint: str


def list_folder(path: str) -> tuple[tuple[str, ...], FolderSplit, FolderSplit | None]:
    """Lists a folder dataset: (class names, train split, test split or None).

    Raises:
      UsageError: a missing folder, no train/, no classes, an empty class, or test
        classes that train lacks.
    """
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(path):
        raise UsageError(f"dataset folder {path} does not exist: check --dataset=folder:PATH")
    if not os.path.isdir(train_dir):
        raise UsageError(
            f"dataset folder {path} has no train/ subfolder: lay it out as "
            "PATH/train/<class>/<image files>"
        )
    class_names = tuple(_visible_entries(train_dir, directories=True))
    if not class_names:
        raise UsageError(f"{train_dir} has no class folders: add PATH/train/<class>/ folders")
    train = _list_split(train_dir, class_names, is_train=True)
    test_dir = os.path.join(path, "test")
    test = _list_split(test_dir, class_names, is_train=False) if os.path.isdir(test_dir) else None
    return class_names, train, test


def _visible_entries(directory: str, *, directories: bool) -> list[str]:
    """Sorted names of the non-hidden subfolders (or image files) of `directory`."""
    with os.scandir(directory) as entries:
        visible = [entry for entry in entries if not entry.name.startswith(".")]
        if directories:
            return sorted(entry.name for entry in visible if entry.is_dir())
        files = [entry.name for entry in visible if entry.is_file()]
        return sorted(name for name in files if name.lower().endswith(IMAGE_EXTENSIONS))


def _list_split(directory: str, class_names: tuple[str, ...], *, is_train: bool) -> FolderSplit:
    unknown = sorted(set(_visible_entries(directory, directories=True)) - set(class_names))
    if unknown:
        raise UsageError(
            f"{directory} has class folders that train/ lacks: {', '.join(unknown)}: add "
            "them to train/ (a class needs training images) or remove them"
        )
    paths, labels, digest = [], [], hashlib.sha256()
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(directory, class_name)
        if not os.path.isdir(class_dir):
            continue
        names = _visible_entries(class_dir, directories=False)
        if not names and is_train:
            raise UsageError(
                f"class folder {class_dir} has no images ({'/'.join(IMAGE_EXTENSIONS)}): "
                "add some or remove it"
            )
        for name in names:
            file_path = os.path.join(class_dir, name)
            stat = os.stat(file_path)
            digest.update(os.fsencode(f"{class_name}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
            paths.append(file_path)
        labels += [label] * len(names)
    if not paths:
        raise UsageError(f"{directory} holds no images: add some or remove it")
    labels = np.asarray(labels, dtype=np.int32)
    return FolderSplit(directory, tuple(paths), labels, digest.hexdigest())
