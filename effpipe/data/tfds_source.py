"""A tensorflow-datasets image-classification dataset as encoded splits.

Records are read in the dataset's own order with the image left encoded
(`tfds.decode.SkipDecoding`), so the first pass decodes them in effpipe's parallel
map at the storage size (`effpipe.data.cache`) instead of tfds decoding every image
at full size. Splits are the ones the dataset defines (train, and validation and
test when it has them); class names come from its ClassLabel feature.
"""

import dataclasses
import hashlib
import os
from collections.abc import Callable

from effpipe.data import cache
from effpipe.errors import UsageError

SPLIT_NAMES = ("train", "validation", "test")
# Where tensorflow-datasets downloads from first (its mirror), and CIFAR-100's own host:
# checked only to fail in seconds, not minutes of retries, without network.
DOWNLOAD_HOSTS = {"cifar100": "www.cs.toronto.edu"}
DEFAULT_DOWNLOAD_HOST = "storage.googleapis.com"


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
    """A prepared tfds dataset: its builder and the features effpipe reads.

    Attributes:
      name: NAME[/CONFIG][@VERSION] as given.
      builder: the prepared tfds builder.
      image_key, label_key: the Image and ClassLabel features.
      class_names: the ClassLabel's names.
      native_size: the side of the images when they all have one square size
        (CIFAR-100: 32), else 0.
    """

    name: str
    builder: object
    image_key: str
    label_key: str
    class_names: tuple[str, ...]
    native_size: int

    def encoded_splits(self) -> dict[str, cache.EncodedSplit]:
        """{split name: the split's encoded records}, for each split the dataset has."""
        return {split: self._encoded(split) for split in self._split_names()}

    def _split_names(self) -> list[str]:
        # tfds.testing.mock_data lists no splits (and serves any name): train and test.
        known = set(self.builder.info.splits.keys()) or {"train", "test"}
        if "train" not in known:
            raise UsageError(f"tfds:{self.name} has no train split (it has {sorted(known)})")
        return [name for name in SPLIT_NAMES if name in known]

    def _records(self, split: str):
        """(encoded image, label) of every record of `split`, in the files' order: a
        record's position is its place in the split."""
        import tensorflow_datasets as tfds

        # Only the image (left encoded) and the label are read: other features (masks,
        # boxes) are never decoded.
        decoders = tfds.decode.PartialDecoding(
            {self.image_key: True, self.label_key: True},
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        # Nothing kept in memory (tfds would cache a small dataset's records); one
        # file after the other.
        read_config = tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1)
        dataset = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        return dataset.map(lambda example: (example[self.image_key], example[self.label_key]))

    def _encoded(self, split: str) -> cache.EncodedSplit:
        info = self.builder.info.splits[split] if self.builder.info.splits.keys() else None
        count = info.num_examples if info else int(self._records(split).reduce(0, _count))
        return cache.EncodedSplit(
            name=f"tfds-{self.builder.name}-{split}",
            count=count,
            fingerprint=self._fingerprint(split, info),
            make_records=lambda: self._records(split),
            describe=lambda position: f"record {position} of tfds:{self.name} {split}",
        )

    def _fingerprint(self, split: str, info) -> str:
        """The dataset's full name and version, the split, and its files' sizes and times."""
        digest = hashlib.sha256(f"{self.builder.info.full_name}\0{split}".encode())
        for filename in getattr(info, "filenames", None) or ():
            path = os.path.join(self.builder.data_dir, filename)
            if os.path.exists(path):
                stat = os.stat(path)
                digest.update(f"\0{filename}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def _count(total, _):
    return total + 1


def tfds_name(spec: str) -> str:
    """NAME[/CONFIG][@VERSION] in tensorflow-datasets' own form, NAME[/CONFIG][:VERSION]."""
    name, _, version = spec.partition("@")
    return f"{name}:{version}" if version else name


def open_dataset(spec: str, data_dir: str | None, *, reachable: Callable[[str], bool]):
    """Opens (downloading and preparing when needed and possible) a tfds dataset.

    Args:
      spec: NAME[/CONFIG][@VERSION].
      data_dir: the tensorflow-datasets data directory (None: ~/tensorflow_datasets).
      reachable: host -> whether the network reaches it.

    Returns:
      The TfdsDataset.

    Raises:
      UsageError: an unknown name, a dataset that is not prepared and cannot be
        downloaded here, or one without an Image and a ClassLabel feature.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name(spec), data_dir=data_dir)
    except Exception as error:  # tfds raises several types for an unknown name.
        raise UsageError(
            f"tfds:{spec} is not a tensorflow-datasets dataset ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}): see https://www.tensorflow.org/datasets/catalog"
        ) from error
    try:
        builder.as_dataset(split="train")
    except AssertionError:  # tfds: "could not find data", not prepared.
        _prepare(builder, spec, data_dir, reachable)
    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, "image", spec)
    label_key = _feature_key(features, tfds.features.ClassLabel, "label", spec)
    shape = features[image_key].shape
    native = shape[0] if shape[0] and shape[0] == shape[1] else 0
    return TfdsDataset(
        spec, builder, image_key, label_key, tuple(features[label_key].names), native
    )


def _feature_key(features, feature_type, preferred: str, spec: str) -> str:
    keys = [key for key, feature in features.items() if isinstance(feature, feature_type)]
    if not keys:
        raise UsageError(
            f"tfds:{spec} has no {feature_type.__name__} feature (it has "
            f"{', '.join(features.keys())}): effpipe trains on image classification datasets"
        )
    return preferred if preferred in keys else keys[0]


def _prepare(builder, spec: str, data_dir: str | None, reachable) -> None:
    location = data_dir or "~/tensorflow_datasets"
    host = DOWNLOAD_HOSTS.get(builder.name, DEFAULT_DOWNLOAD_HOST)
    command = f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name(spec)}').download_and_prepare()\""
    if not reachable(host):
        raise UsageError(
            f"tfds:{spec} is not prepared under {location} and there is no network to "
            f"download it: run `{command}` on a machine with network and copy "
            "~/tensorflow_datasets here, or point --data_dir at a prepared copy"
        )
    try:
        builder.download_and_prepare()
    except Exception as error:  # tfds raises many types (manual downloads too).
        raise UsageError(
            f"tfds:{spec} could not be prepared in {location} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}): prepare it by hand "
            "(see its catalog page) or point --data_dir at a prepared copy"
        ) from error
