"""Splits as labels and positions in an image store: carving one up decodes nothing."""

import dataclasses

import numpy as np

from effpipe.config import DataConfig
from effpipe.data import stores
from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Split:
    """Labels (N,) int32 and the positions (N,) int64 of their images in `store`;
    `Split(images, labels)` wraps an in-memory array (the shapes source, tests)."""

    store: object
    labels: np.ndarray
    positions: np.ndarray | None = None

    def __post_init__(self):
        if isinstance(self.store, np.ndarray):
            object.__setattr__(self, "store", stores.ArrayStore(self.store))
        if self.positions is None:
            object.__setattr__(self, "positions", np.arange(len(self.labels), dtype=np.int64))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        """The examples at `index` (positions in this split), in that order."""
        return Split(self.store, self.labels[index], self.positions[index])

    def load_images(self, count: int | None = None) -> np.ndarray:
        """The first `count` images (all: small splits only), (count, H, W, 3) uint8."""
        positions = self.positions if count is None else self.positions[:count]
        return stores.load_images(self.store, positions)

    @property
    def images(self) -> np.ndarray:
        """Every image of the split in memory (small splits: tests and benchmarks)."""
        return self.load_images()


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A loaded --dataset: its splits (`train` before validation is carved off it, unless
    the source has its own, tfds), class names and the files that could not be decoded."""

    name: str
    train: Split
    test: Split | None
    class_names: tuple[str, ...]
    validation: Split | None = None
    skipped: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def source_image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images as stored on the host."""
        return stores.image_size(self.train.store)


def split_validation(
    split: Split, fraction: float, *, seed: int, selection: str = "random"
) -> tuple[Split, Split]:
    """Splits (train, validation) deterministically off a train split.

    Args:
      fraction: share of examples that go to validation, in (0, 1).
      selection: "random" takes a seeded random subset; "last" takes the last
        examples in stored order, as Keras `validation_split` does.

    Raises:
      UsageError: when either part would be empty.
    """
    positions = validation_positions(len(split), fraction, seed=seed, selection=selection)
    return tuple(split.subset(index) for index in positions)


def validation_positions(
    num_examples: int, fraction: float, *, seed: int, selection: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """`split_validation` on positions alone: (train, validation) positions, increasing.

    Raises:
      UsageError: when either part would be empty.
    """
    num_validation = int(round(num_examples * fraction))
    if not 0 < num_validation < num_examples:
        raise UsageError(
            f"--validation_fraction={fraction} of {num_examples} examples leaves an empty "
            "train or validation split: use more examples or another fraction"
        )
    if selection == "last":
        order = np.arange(num_examples)
    else:
        order = np.random.default_rng(seed).permutation(num_examples)
    num_train = num_examples - num_validation
    return np.sort(order[:num_train]), np.sort(order[num_train:])


def configured_splits(
    data: DataConfig, source: DataSource, *, seed: int
) -> tuple[Split, Split, Split, str]:
    """(train, validation, evaluated split, "test" or "validation"): the trainer and
    `effpipe.evaluate` share it, so both evaluate the same images (test, else validation)."""
    if source.validation is not None:
        train, validation = source.train, source.validation
    else:
        train, validation = split_validation(
            source.train, data.validation_fraction, seed=seed, selection=data.validation_selection
        )
    if source.test is None:
        return train, validation, validation, "validation"
    return train, validation, source.test, "test"
