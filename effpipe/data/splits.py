"""A source's splits as index lists over an image store: train, validation, test.

A `Split` holds no decoded pixels of its own: its labels, and the positions of its
images in a store (`effpipe.data.stores`): rows of an array in memory, files decoded
on every read, or files of the decoded cache. Carving validation off train, and a
worker's shard, are index operations, done before anything is decoded.
"""

import dataclasses

import numpy as np

from effpipe.config import DataConfig
from effpipe.data import stores
from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Split:
    """Labels (N,) int32 and the positions (N,) int64 of their images in `store`.

    Built from an array, `Split(images, labels)`, it holds the array in memory
    (the shapes source, tests).
    """

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
        """The first `count` images (all by default) decoded, (count, H, W, 3) uint8.

        For samples and small splits: the whole of a large split does not fit in memory.
        """
        positions = self.positions if count is None else self.positions[:count]
        return stores.load_images(self.store, positions)

    @property
    def images(self) -> np.ndarray:
        """Every image of the split in memory (small splits: tests and benchmarks)."""
        return self.load_images()


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A loaded source: its splits and what the model needs to know about it.

    Attributes:
      name: the `--dataset` value it was loaded from.
      train: the training split, before validation is split off.
      test: the test split, or None when the source has none.
      class_names: one name per class, indexed by label.
      validation: a validation split the source defines itself (tfds), else None:
        validation is then carved from train.
      skipped: paths of files left out because they could not be decoded.
    """

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
    """Splits a validation set off a train split, deterministically.

    Args:
      split: the full train split.
      fraction: share of examples that go to validation, in (0, 1).
      seed: seeds the shuffle for `selection="random"`.
      selection: "random" takes a seeded random subset; "last" takes the last
        examples in stored order, as Keras `validation_split` does.

    Returns:
      (train, validation).

    Raises:
      UsageError: when either part would be empty.
    """
    train_index, validation_index = validation_positions(
        len(split), fraction, seed=seed, selection=selection
    )
    return split.subset(train_index), split.subset(validation_index)


def validation_positions(
    num_examples: int, fraction: float, *, seed: int, selection: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions), each increasing: `split_validation`
    on positions alone, before anything is decoded.

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
    return np.sort(order[: num_examples - num_validation]), np.sort(
        order[num_examples - num_validation :]
    )


def configured_splits(
    data: DataConfig, source: DataSource, *, seed: int
) -> tuple[Split, Split, Split, str]:
    """The run's train and validation splits, and the split its evaluation reads.

    The trainer and `effpipe.evaluate` share it, so both evaluate the same images:
    the test split, or the validation split when the source has none. A source
    with its own validation split (tfds) keeps it; otherwise validation is carved
    from train.

    Returns:
      (train, validation, evaluated split, "test" or "validation").
    """
    if source.validation is not None:
        train, validation = source.train, source.validation
    else:
        train, validation = split_validation(
            source.train,
            data.validation_fraction,
            seed=seed,
            selection=data.validation_selection,
        )
    if source.test is None:
        return train, validation, validation, "validation"
    return train, validation, source.test, "test"
