"""A tensorflow-datasets dataset prepared here in several files, decoded into the cache.

tfds.testing.mock_data serves made-up examples without files, so this module builds a
real dataset (JPEG images of two shapes in three tfrecord files per split) with
tensorflow-datasets' own writer: bad records and damaged files are real ones.
"""

import glob
import os

import image_files
import numpy as np
import pytest
import tensorflow_datasets as tfds

from effpipe import config
from effpipe.data import sources, stores
from effpipe.errors import UsageError

SIZE = 16
TRAIN, TEST, FILES = 24, 6, 3


class EffpipeStreamTest(tfds.core.GeneratorBasedBuilder):
    """24 train and 6 test images in three classes, JPEG, 20x30 and 30x20 px."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=["ant", "bee", "cat"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(TRAIN, 0),
            "test": self._generate_examples(TEST, 1),
        }

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        ramp = np.linspace(0, 255, 30)
        for index in range(count):
            # Smooth ramps with a little noise: JPEG keeps them apart after decoding.
            height, width = (20, 30) if index % 2 else (30, 20)
            image = np.empty((height, width, 3), np.float64)
            image[..., 0] = ramp[:width][None, :] * rng.uniform(0.3, 1)
            image[..., 1] = ramp[:height][:, None] * rng.uniform(0.3, 1)
            image[..., 2] = rng.uniform(0, 255)
            image += rng.normal(0, 8, image.shape)
            yield index, {"image": np.clip(image, 0, 255).astype(np.uint8), "label": index % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    EffpipeStreamTest(data_dir=root).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=FILES)
    )
    return root


def _load(data_dir, cache_root, mode, name="effpipe_stream_test", on_bad_image="fail"):
    data = config.DataConfig(
        dataset=f"tfds:{name}",
        data_dir=data_dir,
        cache=mode,
        source_size=SIZE,
        on_bad_image=on_bad_image,
    )
    return sources.load_configured_source(data, size=SIZE, seed=0, cache_root=str(cache_root))


def test_the_disk_cache_holds_the_records_in_order_as_memory_does(data_dir, tmp_path):
    memory = _load(data_dir, tmp_path / "cache", "memory")
    disk = _load(data_dir, tmp_path / "cache", "disk")
    assert isinstance(disk.train.store, stores.CacheStore)
    assert (len(disk.train), len(disk.test)) == (TRAIN, TEST)
    np.testing.assert_array_equal(disk.train.images, memory.train.images)
    np.testing.assert_array_equal(disk.train.labels, memory.train.labels)
    assert disk.class_names == ("ant", "bee", "cat")
    # Records in the files' order: the generator's labels, index % 3, are shuffled by
    # tfds' writer, so compare with what tfds itself reads in order.
    builder = tfds.builder("effpipe_stream_test", data_dir=data_dir)
    read = builder.as_dataset(
        split="train", shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
    )
    np.testing.assert_array_equal(disk.train.labels, [int(e["label"]) for e in read])


def test_off_is_refused_for_tfds_in_one_line(data_dir, tmp_path):
    with pytest.raises(UsageError, match="--cache=auto, memory or disk"):
        _load(data_dir, tmp_path / "cache", "off")


def test_a_record_that_cannot_be_read_stops_the_pass_in_one_line(tmp_path):
    root = str(tmp_path / "tfds")
    EffpipeStreamTest(data_dir=root).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=FILES)
    )
    # A byte changed inside a record of the second file: its checksum no longer
    # matches (a damaged disk or copy), so the record cannot be read.
    [second] = glob.glob(os.path.join(root, "**", "*train.tfrecord-00001-of-*"), recursive=True)
    with open(second, "r+b") as file:
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0xFF]))
    for mode in ("memory", "disk"):
        with pytest.raises(
            UsageError,
            match=r"cannot read the tfds-effpipe_stream_test-train images \(corrupted record at \d+\): a read",
        ):
            _load(root, tmp_path / "cache", mode, on_bad_image="skip")


class EffpipeStreamBadTest(EffpipeStreamTest):
    """EffpipeStreamTest with train record 5 a JPEG cut short (an interrupted copy)."""

    def _generate_examples(self, count, seed):
        for index, example in super()._generate_examples(count, seed):
            if seed == 0 and index == 5:
                path = os.path.join(self.data_dir, "cut.jpg")
                image_files.write_truncated_jpeg(path)
                example = {**example, "image": path}
            yield index, example


def test_a_record_that_does_not_decode_is_skipped_and_counted(tmp_path):
    root = str(tmp_path / "tfds")
    EffpipeStreamBadTest(data_dir=root).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=FILES)
    )
    for mode in ("memory", "disk"):
        loaded = _load(root, tmp_path / "cache", mode, "effpipe_stream_bad_test", "skip")
        assert (
            len(loaded.skipped) == 1
            and "of tfds:effpipe_stream_bad_test train" in loaded.skipped[0]
        )
        assert len(loaded.train) == TRAIN - 1
    with pytest.raises(UsageError, match="cannot decode image record"):
        _load(root, tmp_path / "cache", "memory", "effpipe_stream_bad_test", "fail")
