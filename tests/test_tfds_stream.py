"""--cache=off for tfds: a dataset prepared here in several files, streamed and decoded
on every pass.

tfds.testing.mock_data serves made-up examples without files, so this module builds a
real dataset (JPEG images of two shapes in three tfrecord files per split) with
tensorflow-datasets' own writer.
"""

import hashlib
import json
import os

import image_files
import numpy as np
import pytest
import tensorflow_datasets as tfds
from binaries import run_train

from effpipe.data import cache, pipeline, sources, splits, stores
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


def _load(data_dir, cache_root, mode):
    return sources.load_tfds(
        "effpipe_stream_test",
        data_dir=data_dir,
        size=SIZE,
        keep_native_size=False,
        crop="resize",
        mode=mode,
        cache_root=str(cache_root),
        memory_budget_mb=256,
        on_bad_image="fail",
    )


def _digests(images):
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]


def _stream(split, *, batches, batch_size=4, shard=(1, 0), seed=0):
    dataset = pipeline.make_dataset(
        split, batch_size=batch_size, is_training=True, seed=seed, shard=shard
    )
    images, labels = zip(*dataset.take(batches).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


def test_a_streamed_split_numbers_and_decodes_its_records_as_the_cache_does(data_dir, tmp_path):
    memory = _load(data_dir, tmp_path / "cache", "memory")
    off = _load(data_dir, tmp_path / "cache", "off")
    assert isinstance(off.train.store, stores.RecordStore)
    assert off.train.store.num_files == FILES
    for split in ("train", "test"):
        streamed, cached = getattr(off, split), getattr(memory, split)
        np.testing.assert_array_equal(streamed.labels, cached.labels)
        np.testing.assert_array_equal(streamed.load_images(), cached.load_images())
    positions = np.array([17, 3, 9])
    np.testing.assert_array_equal(
        off.train.subset(positions).load_images(), memory.train.images[positions]
    )
    # The labels were read once and kept: a second load takes them from the file
    # (changed here, so that reading the records again would show).
    kept = sorted(name for name in os.listdir(tmp_path / "cache") if "-labels-" in name)
    assert len(kept) == 2
    train_labels = tmp_path / "cache" / next(name for name in kept if "-train-" in name)
    np.save(train_labels, (memory.train.labels + 1) % 3)
    again = _load(data_dir, tmp_path / "cache", "off")
    np.testing.assert_array_equal(again.train.labels, (memory.train.labels + 1) % 3)


def test_each_training_pass_streams_every_image_once_in_a_new_order(data_dir, tmp_path):
    memory = _load(data_dir, tmp_path / "cache", "memory")
    off = _load(data_dir, tmp_path / "cache", "off")
    images, labels = _stream(off.train, batches=2 * TRAIN // 4)
    first, second = _digests(images[:TRAIN]), _digests(images[TRAIN:])
    assert sorted(first) == sorted(second) == sorted(_digests(memory.train.images))
    assert first != second
    assert first != _digests(memory.train.images)
    # Each image comes with its own label.
    label_of = dict(zip(_digests(memory.train.images), memory.train.labels.tolist()))
    assert [label_of[digest] for digest in first] == labels[:TRAIN].tolist()


def test_workers_read_only_their_own_files(data_dir, tmp_path):
    memory = _load(data_dir, tmp_path / "cache", "memory")
    off = _load(data_dir, tmp_path / "cache", "off")
    per_file = TRAIN // FILES
    for index in range(FILES):
        images, _ = _stream(off.train, batches=per_file // 4, shard=(FILES, index))
        own = memory.train.images[index * per_file : (index + 1) * per_file]
        assert sorted(_digests(images)) == sorted(_digests(own))
    # More workers than files: each still decodes only its share of the records.
    shares = [
        _digests(_stream(off.train, batches=1, shard=(4, i), batch_size=6)[0]) for i in range(4)
    ]
    assert sorted(sum(shares, [])) == sorted(_digests(memory.train.images))


def test_a_carved_validation_split_streams_only_its_records_in_order(data_dir, tmp_path):
    memory = _load(data_dir, tmp_path / "cache", "memory")
    off = _load(data_dir, tmp_path / "cache", "off")
    train, validation = splits.split_validation(off.train, 0.25, seed=0)
    dataset = pipeline.make_dataset(validation, batch_size=4, is_training=False)
    images = np.concatenate([batch for batch, _ in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(images, memory.train.images[validation.positions])
    streamed, _ = _stream(train, batches=len(train) // 6, batch_size=6)
    assert sorted(_digests(streamed)) == sorted(_digests(memory.train.images[train.positions]))


def test_the_disk_cache_decodes_a_split_in_chunks_of_records_and_resumes_by_chunk(
    data_dir, tmp_path, monkeypatch
):
    memory = _load(data_dir, tmp_path / "memory", "memory")
    # 5 chunks of the 24 train records, claimed two at a time.
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 5)
    monkeypatch.setattr(cache, "MAX_CLAIM", 2)
    decode_claimed, claims = cache._decode_claimed, []

    def stopped_after_one_round(
        encoded, size, crop, directory, labels, chunks, claimed, *rest, **tag
    ):
        if "-train" in encoded.name:
            if claims:  # A pass that ends here, as a kill would, its first round done.
                raise RuntimeError("stopped")
            claims.append([chunks[k] for k, _, _ in claimed])
        decode_claimed(encoded, size, crop, directory, labels, chunks, claimed, *rest, **tag)

    monkeypatch.setattr(cache, "_decode_claimed", stopped_after_one_round)
    with pytest.raises(RuntimeError, match="stopped"):
        _load(data_dir, tmp_path / "cache", "disk")
    assert claims == [[(0, 5), (5, 10)]]
    # The rerun decodes the three chunks left, each from its own records.
    claims.clear()

    def counted(encoded, size, crop, directory, labels, chunks, claimed, *rest, **tag):
        if "-train" in encoded.name:
            claims.append([chunks[k] for k, _, _ in claimed])
        decode_claimed(encoded, size, crop, directory, labels, chunks, claimed, *rest, **tag)

    monkeypatch.setattr(cache, "_decode_claimed", counted)
    disk = _load(data_dir, tmp_path / "cache", "disk")
    assert claims == [[(10, 15), (15, 20)], [(20, 24)]]
    assert isinstance(disk.train.store, stores.CacheStore)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(disk, split).labels, getattr(memory, split).labels)
        np.testing.assert_array_equal(getattr(disk, split).images, getattr(memory, split).images)


def test_off_without_files_to_stream_is_one_line(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UsageError, match="--cache=auto, memory or disk"):
            _load(None, tmp_path / "cache", "off")


def test_a_tf_data_service_serves_a_streamed_split(data_dir, tmp_path):
    import tensorflow as tf

    memory = _load(data_dir, tmp_path / "cache", "memory")
    off = _load(data_dir, tmp_path / "cache", "off")
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=dispatcher.target.split("://")[1]
        )
    )
    service = pipeline.DataService(dispatcher.target, "tfds-stream")
    dataset = pipeline.make_dataset(
        off.train, batch_size=4, is_training=False, data_service=service
    )
    images = np.concatenate([batch for batch, _ in dataset.as_numpy_iterator()])
    assert sorted(_digests(images)) == sorted(_digests(memory.train.images))
    del worker


def test_a_training_run_streams_a_tfds_dataset_with_the_cache_off(data_dir, tmp_path):
    # The binary, in a process of its own, opens the dataset from its prepared files:
    # tfds needs no builder code for that.
    workdir = tmp_path / "run"
    result = run_train(
        "--flagfile=flags/smoke.flags",
        "--dataset=tfds:effpipe_stream_test",
        f"--data_dir={data_dir}",
        "--cache=off",
        "--image_size=32",
        "--batch_size=4",
        # Phase 1 alone and no export: the data path is what this test is about.
        "--phase2_epochs=0",
        "--noexport",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["skipped_images"] == 0
    # Streamed: the labels were read once and kept, and no image was cached.
    assert "reading the labels of 24 records" in result.stderr
    cache_root = workdir / "cache" / "images"
    assert list(cache_root.glob("*-labels-*.npy"))
    assert not list(cache_root.rglob(stores.CACHE_FILE))


class EffpipeStreamBadTest(EffpipeStreamTest):
    """EffpipeStreamTest with train record 5 a JPEG cut short (an interrupted copy)."""

    def _generate_examples(self, count, seed):
        for index, example in super()._generate_examples(count, seed):
            if seed == 0 and index == 5:
                path = os.path.join(self.data_dir, "cut.jpg")
                image_files.write_truncated_jpeg(path)
                example = {**example, "image": path}
            yield index, example


def test_with_the_cache_off_a_bad_record_is_skipped_and_counted(tmp_path):
    root = str(tmp_path / "tfds")
    EffpipeStreamBadTest(data_dir=root).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=FILES)
    )
    options = dict(
        data_dir=root,
        size=SIZE,
        keep_native_size=False,
        crop="resize",
        cache_root=str(tmp_path / "cache"),
        memory_budget_mb=256,
    )
    memory = sources.load_tfds(
        "effpipe_stream_bad_test", mode="memory", on_bad_image="skip", **options
    )
    off = sources.load_tfds("effpipe_stream_bad_test", mode="off", on_bad_image="skip", **options)
    assert len(off.skipped) == 1 and off.skipped == memory.skipped
    assert off.train.positions.tolist() == memory.train.positions.tolist()
    assert len(off.train) == TRAIN - 1
    np.testing.assert_array_equal(off.train.labels, memory.train.labels)
    # The stream never meets the bad record: one pass is every other image once.
    images, _ = _stream(off.train, batches=(TRAIN - 1) // 23, batch_size=23)
    assert sorted(_digests(images)) == sorted(_digests(memory.train.images))
