"""Data sources: shapes, folders (files of every kind written here), tfds under mock_data."""

import os

import image_files
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from effpipe import config
from effpipe.data import (
    cifar100_names,
    first_pass,
    folders,
    pipeline,
    shapes,
    sources,
    splits,
    stores,
)
from effpipe.errors import UsageError


def _check_split(split, size, num_classes):
    assert split.images.dtype == np.uint8
    assert split.images.shape[1:] == (size, size, 3)
    assert split.labels.dtype == np.int32
    assert len(split.images) == len(split.labels)
    assert split.labels.min() >= 0 and split.labels.max() < num_classes


# --- shapes ---


def test_shapes_is_deterministic_balanced_and_labelled():
    kwargs = dict(num_classes=4, train_examples=40, test_examples=12, image_size=24)
    first = shapes.make_shapes_source(seed=7, **kwargs)
    second = shapes.make_shapes_source(seed=7, **kwargs)
    other = shapes.make_shapes_source(seed=8, **kwargs)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert not np.array_equal(first.train.images, other.train.images)
    _check_split(first.train, 24, 4)
    _check_split(first.test, 24, 4)
    assert np.bincount(first.train.labels).tolist() == [10, 10, 10, 10]
    assert first.class_names == ("circle", "square", "triangle", "plus")
    assert first.source_image_size == (24, 24)
    # Train and test come from independent draws.
    assert not np.array_equal(first.train.images[:12], first.test.images)


def test_shapes_are_visible_against_their_background():
    source = shapes.make_shapes_source(
        num_classes=10, train_examples=50, test_examples=1, image_size=32, seed=0
    )
    spread = source.train.images.reshape(50, -1, 3).astype(int)
    contrast = (spread.max(axis=1) - spread.min(axis=1)).max(axis=1)
    assert contrast.min() >= 60


# --- validation split ---


def test_random_validation_split_is_seeded_and_disjoint():
    split = splits.Split(
        np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, axis=-1),
        np.arange(100, dtype=np.int32),
    )
    train, validation = splits.split_validation(split, 0.2, seed=3)
    train_again, validation_again = splits.split_validation(split, 0.2, seed=3)
    _, validation_other = splits.split_validation(split, 0.2, seed=4)
    assert len(train) == 80 and len(validation) == 20
    assert set(train.labels).isdisjoint(validation.labels)
    np.testing.assert_array_equal(validation.labels, validation_again.labels)
    np.testing.assert_array_equal(train.labels, train_again.labels)
    assert not np.array_equal(validation.labels, validation_other.labels)
    # Images travel with their labels.
    np.testing.assert_array_equal(validation.images[:, 0, 0, 0], validation.labels)


def test_last_validation_split_takes_the_tail_like_keras():
    split = splits.Split(np.zeros((10, 2, 2, 3), np.uint8), np.arange(10, dtype=np.int32))
    train, validation = splits.split_validation(split, 0.3, seed=0, selection="last")
    assert train.labels.tolist() == list(range(7))
    assert validation.labels.tolist() == [7, 8, 9]


def test_validation_split_refuses_an_empty_part():
    split = splits.Split(np.zeros((3, 2, 2, 3), np.uint8), np.arange(3, dtype=np.int32))
    with pytest.raises(UsageError, match="empty train or validation"):
        splits.split_validation(split, 0.1, seed=0)


# --- folder:PATH ---


def _load(dataset, tmp_path, *, size=16, **data_flags):
    """The source as the trainer loads it, its caches under tmp_path/cache."""
    data = config.DataConfig(dataset=dataset, **data_flags)
    return sources.load_configured_source(
        data, size=size, seed=0, cache_root=str(tmp_path / "cache")
    )


def _write_image(path, array, kind):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encoded = tf.io.encode_png(array) if kind == "png" else tf.io.encode_jpeg(array)
    tf.io.write_file(path, encoded)


def _make_folder(root, with_test=True):
    rng = np.random.default_rng(0)
    for split, count in [("train", 3)] + ([("test", 1)] if with_test else []):
        for class_name in ("cat", "dog"):
            for index in range(count):
                image = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
                kind = "png" if index % 2 == 0 else "jpg"
                _write_image(os.path.join(root, split, class_name, f"{index}.{kind}"), image, kind)


@pytest.mark.parametrize("cache", ["memory", "disk", "off"])
def test_folder_loads_png_and_jpeg_resized_with_class_names(tmp_path, cache):
    _make_folder(str(tmp_path / "data"))
    source = _load(f"folder:{tmp_path / 'data'}", tmp_path, cache=cache)
    assert source.class_names == ("cat", "dog")
    _check_split(source.train, 16, 2)
    _check_split(source.test, 16, 2)
    assert source.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert source.test.labels.tolist() == [0, 1]
    assert source.source_image_size == (16, 16)


@pytest.mark.parametrize("cache", ["memory", "disk", "off"])
def test_folder_reads_file_and_class_names_in_any_encoding(tmp_path, cache):
    root = tmp_path / "data"
    image = np.full((20, 20, 3), 200, np.uint8)
    _write_image(str(root / "train" / "café" / "über.jpg"), image, "jpg")
    _write_image(str(root / "train" / "café" / "日本.png"), image, "png")
    # A name that is not UTF-8 (a Latin-1 é), as old archives hold.
    raw = os.path.join(os.fsencode(root / "train" / "dog"), b"\xe9t\xe9.png")
    _write_image(str(root / "train" / "dog" / "a.png"), image, "png")
    os.rename(os.fsencode(root / "train" / "dog" / "a.png"), raw)
    source = _load(f"folder:{root}", tmp_path, size=8, cache=cache)
    assert source.class_names == ("café", "dog")
    assert source.train.labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(source.train.images.mean(axis=(1, 2, 3)), 200, atol=2)


def test_a_file_that_cannot_be_read_is_not_counted_as_a_bad_image(tmp_path, monkeypatch):
    # A read error (here a file removed after the listing) stops the run in one line:
    # it would otherwise be kept in the cache as an image that does not decode.
    _make_folder(str(tmp_path / "data"), with_test=False)
    list_folder = folders.list_folder

    def listed_then_removed(path):
        listed = list_folder(path)
        os.remove(listed[1].paths[1])
        return listed

    monkeypatch.setattr(folders, "list_folder", listed_then_removed)
    for cache in ("memory", "disk"):
        with pytest.raises(UsageError, match=r"cannot read .*1\.jpg \(No such file"):
            _load(f"folder:{tmp_path / 'data'}", tmp_path, cache=cache, on_bad_image="skip")
        _make_folder(str(tmp_path / "data"), with_test=False)


@pytest.mark.parametrize(
    "cache_mode, on_bad_image", [("memory", "fail"), ("disk", "fail"), ("off", "skip")]
)
def test_an_image_that_decodes_when_read_again_is_kept(
    tmp_path, monkeypatch, cache_mode, on_bad_image
):
    # A read error that has cleared by the time the pass reads the file again (here
    # the file is cut short during the pass and whole again at the second read): the
    # image is decoded and kept, not counted as one that does not decode.
    root = tmp_path / "data"
    _make_folder(str(root), with_test=False)
    whole = _load(f"folder:{root}", tmp_path / "whole", cache="memory")
    damaged = root / "train" / "dog" / "1.jpg"
    contents = damaged.read_bytes()
    damaged.write_bytes(contents[: len(contents) // 2])
    read_again = first_pass._read_again

    def whole_again(*args):
        damaged.write_bytes(contents)
        return read_again(*args)

    monkeypatch.setattr(first_pass, "_read_again", whole_again)
    source = _load(f"folder:{root}", tmp_path, cache=cache_mode, on_bad_image=on_bad_image)
    assert source.skipped == ()
    assert source.train.labels.tolist() == whole.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(source.train.images, whole.train.images)


def test_folder_ignores_hidden_folders_and_files(tmp_path):
    root = tmp_path / "data"
    image_files.write_class_folder_tree(
        root, {"train": {"cat": ["a.jpg", "b.png"], "dog": ["c.jpg", ".hidden.jpg"]}}
    )
    (root / "train" / "cat" / "notes.txt").write_text("not an image, not listed")
    source = _load(f"folder:{root}", tmp_path)
    assert source.class_names == ("cat", "dog")
    assert source.train.labels.tolist() == [0, 0, 1]


def test_folder_converts_grayscale_palette_and_rgba(tmp_path):
    _make_folder(str(tmp_path), with_test=False)
    gray = np.full((20, 20, 1), 200, np.uint8)
    rgba = np.concatenate(
        [np.full((20, 20, 3), 50, np.uint8), np.full((20, 20, 1), 9, np.uint8)], -1
    )
    _write_image(str(tmp_path / "train" / "cat" / "gray.png"), gray, "png")
    _write_image(str(tmp_path / "train" / "dog" / "rgba.png"), rgba, "png")
    palette = PIL.Image.new("P", (20, 20), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.save(tmp_path / "train" / "dog" / "zz_palette.png")
    source = _load(f"folder:{tmp_path}", tmp_path, size=8)
    assert source.test is None
    assert len(source.train) == 9
    images = source.train.images
    np.testing.assert_array_equal(images[-1], np.full((8, 8, 3), [10, 20, 30]))
    # Grayscale becomes three equal channels; RGBA loses its alpha.
    gray_index = sorted(os.listdir(tmp_path / "train" / "cat")).index("gray.png")
    np.testing.assert_array_equal(images[gray_index], np.full((8, 8, 3), 200))
    rgba_index = 4 + sorted(os.listdir(tmp_path / "train" / "dog")).index("rgba.png")
    np.testing.assert_array_equal(images[rgba_index], np.full((8, 8, 3), 50))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("missing", "does not exist"),
        ("no_train", "has no train/ subfolder"),
        ("empty_class", "has no images"),
        ("corrupt", "cannot decode image"),
        ("test_only_class", "class folders that train/ lacks: bird"),
    ],
)
def test_folder_errors_name_the_problem(tmp_path, damage, fragment):
    root = tmp_path / "data"
    _make_folder(str(root))
    if damage == "missing":
        root = tmp_path / "nowhere"
    elif damage == "no_train":
        os.rename(root / "train", root / "training")
    elif damage == "empty_class":
        os.makedirs(root / "train" / "empty")
    elif damage == "corrupt":
        (root / "train" / "dog" / "broken.png").write_bytes(b"not an image at all")
    elif damage == "test_only_class":
        _write_image(str(root / "test" / "bird" / "0.png"), np.zeros((4, 4, 3), np.uint8), "png")
    with pytest.raises(UsageError) as raised:
        _load(f"folder:{root}", tmp_path, size=8)
    assert fragment in str(raised.value)
    assert "\n" not in str(raised.value)
    if damage == "corrupt":
        assert "broken.png" in str(raised.value)


def _write_bad_files(train_dog):
    image_files.write_truncated_jpeg(train_dog / "cut.jpg")
    image_files.write_empty_file(train_dog / "empty.png")
    image_files.write_text_as_jpg(train_dog / "text.jpg")


@pytest.mark.parametrize("cache", ["memory", "disk", "off"])
def test_folder_skips_bad_files_counting_them(tmp_path, caplog, cache):
    _make_folder(str(tmp_path / "data"), with_test=False)
    _write_bad_files(tmp_path / "data" / "train" / "dog")
    if cache != "off":
        # --cache=off decodes nothing before training: a bad file stops it there.
        with pytest.raises(UsageError, match="--on_bad_image=skip"):
            _load(f"folder:{tmp_path / 'data'}", tmp_path, size=8, cache=cache)
    with caplog.at_level("WARNING"):
        source = _load(
            f"folder:{tmp_path / 'data'}", tmp_path, size=8, cache=cache, on_bad_image="skip"
        )
    assert source.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(os.path.basename(path) for path in source.skipped) == [
        "cut.jpg",
        "empty.png",
        "text.jpg",
    ]
    assert "skipped 3 of 9" in caplog.text and "cut.jpg" in caplog.text
    assert source.train.images.shape == (6, 8, 8, 3)


def test_without_cache_the_bad_files_are_found_once_and_the_splits_match_the_cache(
    tmp_path, caplog
):
    # --cache=off with --on_bad_image=skip decodes the split once to find the bad
    # files, so its splits, its stream and its count equal a cached run's; later
    # runs on the same files reuse that scan, and a changed file scans again.
    _make_folder(str(tmp_path / "data"), with_test=True)
    _write_bad_files(tmp_path / "data" / "train" / "dog")
    image_files.write_truncated_jpeg(tmp_path / "data" / "test" / "cat" / "cut.jpg")

    def load(cache):
        data = config.DataConfig(
            dataset=f"folder:{tmp_path / 'data'}", cache=cache, on_bad_image="skip"
        )
        source = sources.load_configured_source(
            data, size=8, seed=0, cache_root=str(tmp_path / "cache")
        )
        return source, splits.configured_splits(data, source, seed=0)

    cached, (cached_train, cached_validation, cached_test, _) = load("memory")
    with caplog.at_level("INFO", logger="absl"):
        uncached, (train, validation, evaluated, name) = load("off")
    assert "decoding every image once" in caplog.text
    assert sorted(uncached.skipped) == sorted(cached.skipped) and len(uncached.skipped) == 4
    assert name == "test" and evaluated.positions.tolist() == cached_test.positions.tolist()
    for split, cached_split in ((train, cached_train), (validation, cached_validation)):
        assert split.positions.tolist() == cached_split.positions.tolist()
        assert split.labels.tolist() == cached_split.labels.tolist()
    # The stream of the evaluated split yields its labels in order: predictions are
    # matched to labels by place.
    streamed = [
        label
        for _, batch in pipeline.make_dataset(evaluated, batch_size=2, is_training=False)
        for label in batch.numpy()
    ]
    assert streamed == evaluated.labels.tolist()
    images = np.concatenate(
        [
            batch.numpy()
            for batch, _ in pipeline.make_dataset(train, batch_size=1, is_training=False)
        ]
    )
    np.testing.assert_array_equal(images, cached_train.images)

    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        again, _ = load("off")
    assert "decoding every image once" not in caplog.text
    assert sorted(again.skipped) == sorted(uncached.skipped)
    # A bad file replaced by a good one is a new file list: scanned again.
    os.remove(tmp_path / "data" / "train" / "dog" / "cut.jpg")
    _write_image(
        str(tmp_path / "data" / "train" / "dog" / "cut.jpg"),
        np.zeros((40, 50, 3), np.uint8),
        "jpg",
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        mended, _ = load("off")
    assert "decoding every image once" in caplog.text
    assert len(mended.skipped) == 3 and len(mended.train) == len(uncached.train) + 1


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    _make_folder(str(tmp_path), with_test=False)
    for image in (tmp_path / "train" / "dog").iterdir():
        image.write_bytes(b"corrupt")
    with pytest.raises(UsageError, match="dog has no image that can be decoded"):
        _load(f"folder:{tmp_path}", tmp_path, size=8, on_bad_image="skip")


def test_folder_stores_at_the_model_resolution_by_default(tmp_path):
    root = tmp_path / "data"
    image_files.write_class_folder_tree(root, {"train": {"a": ["1.jpg"], "b": ["2.png"]}})
    flat = dict(dataset=f"folder:{root}", variant="b5", cache_dir=str(tmp_path / "cache"))
    run_config = config.TrainConfig.from_flat(**flat)
    assert run_config.source_size == 456
    source = sources.load_configured_source(
        run_config.data, size=run_config.source_size, seed=0, cache_root=str(tmp_path / "c")
    )
    assert source.source_image_size == (456, 456)
    assert config.TrainConfig.from_flat(dataset="cifar100", variant="b5").source_size == 32


# --- tensorflow-datasets ---


def test_cifar100_under_mock_data_has_fine_labels_and_names(tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        source = _load("cifar100", tmp_path, size=32, data_dir=str(tmp_path))
    _check_split(source.train, 32, 100)
    _check_split(source.test, 32, 100)
    assert len(source.train) == 24 and len(source.test) == 24
    assert source.num_classes == 100
    assert source.class_names == cifar100_names.FINE_LABEL_NAMES
    assert source.class_names[0] == "apple" and source.class_names[-1] == "worm"
    # Small enough for memory under --cache=auto.
    assert isinstance(source.train.store, stores.ArrayStore)


@pytest.mark.parametrize("name", ["tf_flowers", "oxford_iiit_pet", "imagenette"])
def test_tfds_datasets_under_mock_data_decode_at_the_storage_size(tmp_path, name):
    with tfds.testing.mock_data(num_examples=6):
        source = _load(f"tfds:{name}", tmp_path, size=24, cache="disk")
        builder = tfds.builder(name)
    assert source.class_names == tuple(builder.info.features["label"].names)
    _check_split(source.train, 24, source.num_classes)
    assert isinstance(source.train.store, stores.CacheStore)


def test_tfds_keeps_a_smaller_native_size_by_default(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        data = config.DataConfig(dataset="tfds:cifar10")
        source = sources.load_configured_source(data, size=224, seed=0, cache_root=str(tmp_path))
    assert source.source_image_size == (32, 32)


def test_tfds_unknown_dataset_is_one_line(tmp_path):
    with pytest.raises(UsageError) as raised:
        _load("tfds:no_such_dataset", tmp_path)
    assert "not a tensorflow-datasets dataset" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_cifar100_without_data_or_network_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_host_reachable", lambda host: False)
    with pytest.raises(UsageError) as raised:
        _load("cifar100", tmp_path, data_dir=str(tmp_path))
    message = str(raised.value)
    assert "not prepared" in message and "--data_dir" in message
    assert "\n" not in message
