"""The decoded cache (effpipe.data.cache) and the streams read from it.

Reuse, a fingerprint change, a SIGKILL during the first pass, damaged and foreign
caches, one writer per folder, the same labels and images with and without the cache
for a seed, and each worker's own shard.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import image_files
import numpy as np
import pytest

from effpipe import config
from effpipe.data import cache_files, first_pass, pipeline, sources, stores

SIZE = 12


def _make_folder(root, per_class=12, classes=("ant", "bee", "cat")):
    layout = {
        "train": {name: [f"{index:03d}.jpg" for index in range(per_class)] for name in classes}
    }
    layout["test"] = {name: ["t.png"] for name in classes}
    image_files.write_class_folder_tree(root, layout)
    return root


def _load(root, cache_root, **data_flags):
    data = config.DataConfig(dataset=f"folder:{root}", **data_flags)
    return sources.load_configured_source(data, size=SIZE, seed=0, cache_root=str(cache_root))


def _cache_folders(cache_root):
    return sorted(name for name in os.listdir(cache_root) if name.startswith("folder-train"))


def test_a_second_run_reuses_the_disk_cache_without_decoding(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "data")
    first = _load(root, tmp_path / "cache", cache="disk")
    assert isinstance(first.train.store, stores.CacheStore)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(first_pass, "decode", no_decoding)
    second = _load(root, tmp_path / "cache", cache="disk")
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.train.labels, second.train.labels)


def test_a_changed_file_makes_a_new_cache(tmp_path):
    root = _make_folder(tmp_path / "data")
    _load(root, tmp_path / "cache", cache="disk")
    before = _cache_folders(tmp_path / "cache")
    image_files.write_png_rgb(root / "train" / "ant" / "000.jpg", color=image_files.BLUE)
    changed = _load(root, tmp_path / "cache", cache="disk")
    after = _cache_folders(tmp_path / "cache")
    assert len(before) == 1 and len(after) == 2 and before[0] in after
    # The replaced file's new pixels, not the cached old ones.
    top = changed.train.load_images(1)[0, : SIZE // 2]
    np.testing.assert_allclose(top.reshape(-1, 3).mean(axis=0), image_files.BLUE, atol=2)


def _load_in_a_process(root, cache_root, log_path, env=None):
    """Starts a process that loads the folder with the disk cache; stderr to `log_path`."""
    program = textwrap.dedent(
        f"""
        from absl import logging
        from effpipe import config
        from effpipe.data import sources
        logging.use_absl_handler()
        logging.set_verbosity(logging.INFO)
        data = config.DataConfig(dataset="folder:{root}", cache="disk")
        sources.load_configured_source(data, size={SIZE}, seed=0, cache_root="{cache_root}")
        """
    )
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", program], env={**os.environ, **(env or {})}, stderr=log
        )


def _wait_for_text(path, text, process):
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()[-2000:]
        time.sleep(0.1)


def test_a_first_pass_killed_midway_is_resumed_not_mistaken_for_complete(tmp_path):
    root = _make_folder(tmp_path / "data", per_class=120)
    cache_root = tmp_path / "cache"
    # The hook kills after the first batch of images that reaches 200 (256 of 360).
    log = tmp_path / "killed.log"
    killed = _load_in_a_process(root, cache_root, log, {first_pass.KILL_AFTER_ENV: "200"})
    assert killed.wait() == -signal.SIGKILL, log.read_text()[-2000:]
    [folder] = _cache_folders(cache_root)
    directory = os.path.join(cache_root, folder)
    assert not os.path.exists(os.path.join(directory, cache_files.MANIFEST_FILE))
    log_path = os.path.join(directory, cache_files.PROGRESS_FILE)
    with open(log_path) as log:
        logged = [position for line in log for position in json.loads(line)["positions"]]
    assert len(logged) == 256
    # A kill inside the log's write leaves a line cut short, and a power loss can
    # leave a logged row unwritten: the rerun decodes that row again, never reads it.
    with open(log_path, "a") as log:
        log.write('{"positions": [1, 2')
    row = stores.cached_bytes(SIZE)
    with open(stores.cache_file(directory), "r+b") as rows:
        rows.seek(logged[0] * row)
        rows.write(bytes(row))
    resumed_log = tmp_path / "resumed.log"
    rerun = _load_in_a_process(root, cache_root, resumed_log)
    assert rerun.wait() == 0, resumed_log.read_text()[-2000:]
    assert "255 of 360 images already in" in resumed_log.read_text()
    assert "decoding 105 folder-train images" in resumed_log.read_text()
    resumed = _load(root, cache_root, cache="disk")
    fresh = _load(root, tmp_path / "fresh", cache="memory")
    np.testing.assert_array_equal(resumed.train.images, fresh.train.images)
    np.testing.assert_array_equal(resumed.train.labels, fresh.train.labels)


def _stream(split, seed=3, batches=7, batch_size=8):
    options = pipeline.PipelineOptions(deterministic=True)
    dataset = pipeline.make_dataset(
        split, batch_size=batch_size, is_training=True, seed=seed, options=options
    )
    images, labels = zip(*dataset.take(batches).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)


def test_every_cache_mode_streams_the_same_batches_for_a_seed(tmp_path):
    root = _make_folder(tmp_path / "data")
    streams = {
        mode: _stream(_load(root, tmp_path / "cache", cache=mode).train)
        for mode in ("off", "memory", "disk")
    }
    for mode in ("memory", "disk"):
        np.testing.assert_array_equal(streams[mode][1], streams["off"][1])
        np.testing.assert_array_equal(streams[mode][0], streams["off"][0])
    # Epochs of 4 batches (32 of the 36 images): the second in another order.
    images = streams["off"][0]
    assert not np.array_equal(images[:24], images[32:56])


def test_auto_keeps_a_split_in_memory_only_within_the_budget(tmp_path):
    root = _make_folder(tmp_path / "data")
    small = _load(root, tmp_path / "cache", cache="auto", cache_memory_mb=1)
    large = _load(root, tmp_path / "cache", cache="auto", cache_memory_mb=0)
    assert isinstance(small.train.store, stores.ArrayStore)
    assert isinstance(large.train.store, stores.CacheStore)


@pytest.mark.parametrize("mode", ["off", "disk"])
def test_a_tf_data_service_serves_file_backed_splits(tmp_path, mode):
    import tensorflow as tf

    root = _make_folder(tmp_path / "data", per_class=4)
    source = _load(root, tmp_path / "cache", cache=mode)
    dispatcher = tf.data.experimental.service.DispatchServer()
    address = dispatcher.target.split("://")[1]
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=address)
    )
    service = pipeline.DataService(dispatcher.target, f"files-{mode}")
    dataset = pipeline.make_dataset(
        source.train, batch_size=4, is_training=False, data_service=service
    )
    labels = sorted(label for _, batch in dataset.as_numpy_iterator() for label in batch)
    images = np.concatenate([batch for batch, _ in dataset.as_numpy_iterator()])
    assert labels == sorted(source.train.labels.tolist())
    assert images.shape == (12, SIZE, SIZE, 3)
    # The service's workers read the cache through ImmutableConst, not this process's
    # reads: the same images.
    expected = source.train.load_images()
    assert sorted(image.tobytes() for image in images) == sorted(
        image.tobytes() for image in expected
    )
    del worker


@pytest.mark.parametrize("mode", ["off", "disk"])
def test_an_evaluation_pass_is_deterministic_whatever_the_runs_options(tmp_path, mode):
    # Predictions are matched to labels by place: a one-pass read must keep the
    # split's order even when the run lets parallel stages reorder for speed.
    split = _load(_make_folder(tmp_path / "data"), tmp_path / "cache", cache=mode).train
    fast = pipeline.PipelineOptions(deterministic=False)
    dataset = pipeline.make_dataset(split, batch_size=4, is_training=False, options=fast)
    assert dataset.options().deterministic is True
    images = np.concatenate([batch for batch, _ in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(images, split.load_images())
    training = pipeline.make_dataset(split, batch_size=4, is_training=True, options=fast)
    assert training.options().deterministic is False


def test_the_cache_file_holds_the_images_rows_and_nothing_else(tmp_path):
    root = _make_folder(tmp_path / "data")
    split = _load(root, tmp_path / "cache", cache="disk").train
    images = _load(root, tmp_path / "fresh", cache="memory").train
    rows = np.fromfile(stores.cache_file(split.store.directory), np.uint8)
    assert rows.size == split.store.count * SIZE * SIZE * 3
    np.testing.assert_array_equal(
        rows.reshape(-1, SIZE, SIZE, 3)[split.positions], images.load_images()
    )


def test_a_complete_cache_whose_file_was_cut_short_is_decoded_again(tmp_path):
    root = _make_folder(tmp_path / "data")
    first = _load(root, tmp_path / "cache", cache="disk").train
    with open(stores.cache_file(first.store.directory), "r+b") as rows:
        rows.truncate(100)
    again = _load(root, tmp_path / "cache", cache="disk").train
    np.testing.assert_array_equal(again.images, first.images)


def _damage_flip_a_byte(directory):
    with open(stores.cache_file(directory), "r+b") as rows:
        rows.seek(5 * stores.cached_bytes(SIZE) + 7)
        byte = rows.read(1)
        rows.seek(-1, os.SEEK_CUR)
        rows.write(bytes([byte[0] ^ 1]))


def _damage_truncate(directory):
    with open(stores.cache_file(directory), "r+b") as rows:
        rows.truncate(100)


def _damage_foreign_decoder(directory):
    path = os.path.join(directory, cache_files.MANIFEST_FILE)
    with open(path) as file:
        manifest = json.load(file)
    manifest["decoder"]["tensorflow"] = "2.0.0"
    with open(path, "w") as file:
        json.dump(manifest, file)


@pytest.mark.parametrize(
    "damage, warning",
    [
        (_damage_flip_a_byte, "has 1 rows that changed since written"),
        (_damage_truncate, "is cut short"),
        (_damage_foreign_decoder, "was written by another decoder"),
    ],
)
def test_a_damaged_or_foreign_cache_is_decoded_again_after_one_warning(
    tmp_path, caplog, damage, warning
):
    caplog.set_level(logging.INFO, logger="absl")
    root = _make_folder(tmp_path / "data")
    first = _load(root, tmp_path / "cache", cache="disk").train
    expected = first.images.copy()
    damage(first.store.directory)
    caplog.clear()
    again = _load(root, tmp_path / "cache", cache="disk").train
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warning in warnings[0], warnings
    assert "decoding 36 folder-train images" in caplog.text
    np.testing.assert_array_equal(again.images, expected)
    caplog.clear()
    _load(root, tmp_path / "cache", cache="disk")
    assert "reusing the decoded cache" in caplog.text and "WARNING" not in caplog.text


def _writer_and_waiting_reader(tmp_path, root, cache_root, env=None):
    """A writer held after its first batch (a test hook), and a second process that
    has found the folder locked."""
    gate = tmp_path / "hold"
    gate.touch()
    writer_log, reader_log = tmp_path / "writer.log", tmp_path / "reader.log"
    env = {first_pass.HOLD_ENV: str(gate), **(env or {})}
    writer = _load_in_a_process(root, cache_root, writer_log, env)
    _wait_for_text(writer_log, "decoding 360 folder-train images", writer)
    # Held after its first batch: 256 rows written and logged.
    [folder] = _cache_folders(cache_root)
    _wait_for_text(cache_root / folder / cache_files.PROGRESS_FILE, "\n", writer)
    reader = _load_in_a_process(root, cache_root, reader_log)
    _wait_for_text(reader_log, "which is writing the decoded cache", reader)
    assert "waiting for pid" in reader_log.read_text()
    return gate, writer, reader, reader_log


def test_a_second_process_waits_for_the_writer_and_reads_its_cache(tmp_path):
    root = _make_folder(tmp_path / "data", per_class=120)
    cache_root = tmp_path / "cache"
    gate, writer, reader, reader_log = _writer_and_waiting_reader(tmp_path, root, cache_root)
    gate.unlink()
    assert writer.wait(timeout=600) == 0
    assert reader.wait(timeout=600) == 0, reader_log.read_text()[-2000:]
    assert "reusing the decoded cache" in reader_log.read_text()
    assert "decoding" not in reader_log.read_text()
    np.testing.assert_array_equal(
        _load(root, cache_root, cache="disk").train.images,
        _load(root, tmp_path / "fresh", cache="memory").train.images,
    )


def test_a_waiting_process_resumes_the_pass_of_a_writer_that_died(tmp_path):
    root = _make_folder(tmp_path / "data", per_class=120)
    cache_root = tmp_path / "cache"
    gate, writer, reader, reader_log = _writer_and_waiting_reader(tmp_path, root, cache_root)
    writer.kill()
    writer.wait()
    assert reader.wait(timeout=600) == 0, reader_log.read_text()[-2000:]
    assert "256 of 360 images already in" in reader_log.read_text()
    np.testing.assert_array_equal(
        _load(root, cache_root, cache="disk").train.images,
        _load(root, tmp_path / "fresh", cache="memory").train.images,
    )


def test_each_worker_decodes_only_its_own_shard_into_a_folder_of_its_own(tmp_path):
    root = _make_folder(tmp_path / "data", per_class=10)
    data = config.DataConfig(dataset=f"folder:{root}", cache="disk", validation_fraction=0.2)
    whole = sources.load_configured_source(data, size=SIZE, seed=0, cache_root=str(tmp_path / "a"))
    from effpipe.data import splits

    train, validation, _, _ = splits.configured_splits(data, whole, seed=0)
    shards = []
    for index in range(2):
        share = sources.load_configured_source(
            data, size=SIZE, seed=0, cache_root=str(tmp_path / "b"), workers=(2, index)
        )
        folder = tmp_path / "b" / f"worker-{index}-of-2"
        [train_folder] = [name for name in os.listdir(folder) if "-shard" in name]
        # Only the shard's rows are on the disk: 24 training images, 12 a worker.
        assert os.path.getsize(
            folder / train_folder / stores.CACHE_FILE
        ) == 12 * stores.cached_bytes(SIZE)
        np.testing.assert_array_equal(share.validation.images, validation.images)
        shards.append(share.train)
    # The shards are the pipeline's: every other training image, in order.
    for index, shard in enumerate(shards):
        np.testing.assert_array_equal(shard.images, train.images[index::2])
        np.testing.assert_array_equal(shard.labels, train.labels[index::2])
