"""A loaded source and its splits: train, validation carved from train, test."""

import dataclasses

import numpy as np

from effpipe.config import DataConfig
from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Split:
    """Images (N, H, W, 3) uint8 and labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A loaded source: its splits and what the model needs to know about it.

    Attributes:
      name: the `--dataset` value it was loaded from.
      train: the training split, before validation is split off.
      test: the test split, or None when the source has none.
      class_names: one name per class, indexed by label.
    """

    name: str
    train: Split
    test: Split | None
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def source_image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images as stored on the host."""
        return tuple(self.train.images.shape[1:3])


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
    num_examples = len(split)
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
    train_index = np.sort(order[: num_examples - num_validation])
    validation_index = np.sort(order[num_examples - num_validation :])
    return (
        Split(split.images[train_index], split.labels[train_index]),
        Split(split.images[validation_index], split.labels[validation_index]),
    )


def configured_splits(
    data: DataConfig, source: DataSource, *, seed: int
) -> tuple[Split, Split, Split, str]:
    """The run's train and validation splits, and the split its evaluation reads.

    The trainer and `effpipe.evaluate` share it, so both evaluate the same images:
    the test split, or the validation split when the source has none.

    Returns:
      (train, validation, evaluated split, "test" or "validation").
    """
    train, validation = split_validation(
        source.train,
        data.validation_fraction,
        seed=seed,
        selection=data.validation_selection,
    )
    if source.test is None:
        return train, validation, validation, "validation"
    return train, validation, source.test, "test"
