"""A tensorflow-datasets image-classification dataset as encoded splits.

Images stay encoded (`tfds.decode.SkipDecoding`) so that the first pass decodes them in
effpipe's parallel map at the storage size rather than tfds decoding each at full size.
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
    """A prepared tfds dataset (`name` as given): its builder, the features effpipe reads,
    and `native_size`, the images' side when all share one square size (CIFAR-100: 32), else 0."""

    name: str
    builder: object
    image_key: str
    label_key: str
    class_names: tuple[str, ...]
    native_size: int

    def encoded_splits(self) -> dict[str, cache.EncodedSplit]:
        """{split name: the split's encoded records}, for each split the dataset has."""
        # tfds.testing.mock_data lists no splits (and serves any name): train and test.
        known = set(self.builder.info.splits.keys()) or {"train", "test"}
        if "train" not in known:
            raise UsageError(f"tfds:{self.name} has no train split (it has {sorted(known)})")
        return {split: self._encoded(split) for split in SPLIT_NAMES if split in known}

    def _records(self, split: str):
        """(encoded image, label) of each record; its position is its place in the split."""
        import tensorflow_datasets as tfds

        # Other features (masks, boxes) are never decoded.
        decoders = tfds.decode.PartialDecoding(
            {self.image_key: True, self.label_key: True},
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        # No autocache (it holds small datasets in memory); files in order, one at a time.
        read_config = tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1)
        dataset = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        return dataset.map(lambda example: (example[self.image_key], example[self.label_key]))

    def _encoded(self, split: str) -> cache.EncodedSplit:
        info = self.builder.info.splits[split] if self.builder.info.splits.keys() else None
        count = (
            info.num_examples if info else int(self._records(split).reduce(0, lambda n, _: n + 1))
        )
        # The fingerprint: full name and version, the split, and its files' sizes and times.
        digest = hashlib.sha256(f"{self.builder.info.full_name}\0{split}".encode())
        for filename in getattr(info, "filenames", None) or ():
            path = os.path.join(self.builder.data_dir, filename)
            if os.path.exists(path):
                stat = os.stat(path)
                digest.update(f"\0{filename}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return cache.EncodedSplit(
            name=f"tfds-{self.builder.name}-{split}",
            count=count,
            fingerprint=digest.hexdigest(),
            make_records=lambda: self._records(split),
            describe=lambda position: f"record {position} of tfds:{self.name} {split}",
        )


def tfds_name(spec: str) -> str:
    """NAME[/CONFIG][@VERSION] in tensorflow-datasets' own form, NAME[/CONFIG][:VERSION]."""
    name, _, version = spec.partition("@")
    return f"{name}:{version}" if version else name


def open_dataset(spec: str, data_dir: str | None, *, reachable: Callable[[str], bool]):
    """Opens a tfds dataset, downloading and preparing it when needed and possible.

    Args:
      spec: NAME[/CONFIG][@VERSION].
      data_dir: the tensorflow-datasets data directory (None: ~/tensorflow_datasets).
      reachable: host -> whether the network reaches it (checked before downloading).

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
    class_names = tuple(features[label_key].names)
    return TfdsDataset(spec, builder, image_key, label_key, class_names, native)


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
