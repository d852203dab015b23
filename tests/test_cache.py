"""The decoded cache (effpipe.data.cache) and the streams read from it.

Reuse, a fingerprint change, a SIGKILL during the first pass, the same labels and
images with and without the cache for a seed, and sharding by file.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import image_files
import numpy as np
import pytest

from effpipe import config
from effpipe.data import cache, pipeline, sources, stores
from effpipe.errors import UsageError

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


def _allocation_tag(directory):
    with open(os.path.join(directory, cache.ALLOCATION_FILE)) as file:
        return cache._tag(file.read())


def test_a_second_run_reuses_the_disk_cache_without_decoding(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "data")
    first = _load(root, tmp_path / "cache", cache="disk")
    assert isinstance(first.train.store, stores.CacheStore)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(cache, "_first_pass", no_decoding)
    monkeypatch.setattr(cache, "_decode_chunks", no_decoding)
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


def test_a_first_pass_killed_midway_is_resumed_not_mistaken_for_complete(tmp_path):
    root = _make_folder(tmp_path / "data", per_class=120)
    cache_root = tmp_path / "cache"
    program = textwrap.dedent(
        f"""
        from effpipe import config
        from effpipe.data import sources
        data = config.DataConfig(dataset="folder:{root}", cache="disk")
        sources.load_configured_source(data, size={SIZE}, seed=0, cache_root="{cache_root}")
        """
    )
    # The hook kills after the first batch of images that reaches 200 (256 of 360).
    env = {**os.environ, cache.KILL_AFTER_ENV: "200"}
    killed = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    [folder] = _cache_folders(cache_root)
    assert not os.path.exists(os.path.join(cache_root, folder, cache.MANIFEST_FILE))
    directory = os.path.join(cache_root, folder)
    tag = _allocation_tag(directory)
    # 360 images are one chunk.
    written = cache._logged(directory, 0, 0, 360, tag)
    assert 200 <= len(written) < 360
    # A kill inside the log's write leaves part of a position, and rows outside the
    # log may hold anything: the rerun rewrites them, never reads them as images.
    with open(cache._chunk_file(directory, 0, ".i64", tag), "ab") as log:
        log.write(b"\x07\x00\x00")
    row = stores.cached_bytes(SIZE)
    with open(stores.cache_file(directory), "r+b") as rows:
        rows.seek(int(np.setdiff1d(np.arange(360), written)[0]) * row)
        rows.write(b"\xff" * row)
    np.testing.assert_array_equal(cache._logged(directory, 0, 0, 360, tag), written)
    resumed = _load(root, cache_root, cache="disk")
    fresh = _load(root, tmp_path / "fresh", cache="memory")
    np.testing.assert_array_equal(resumed.train.images, fresh.train.images)
    np.testing.assert_array_equal(resumed.train.labels, fresh.train.labels)


def _stream(split, seed=3, shard=(1, 0), batches=7, batch_size=8):
    options = pipeline.PipelineOptions(deterministic=True)
    dataset = pipeline.make_dataset(
        split, batch_size=batch_size, is_training=True, seed=seed, options=options, shard=shard
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
    # Several passes (36 images, 56 drawn), each a different order.
    assert len(set(streams["off"][1][:36].tolist())) == 3


def test_auto_keeps_a_split_in_memory_only_within_the_budget(tmp_path):
    root = _make_folder(tmp_path / "data")
    small = _load(root, tmp_path / "cache", cache="auto", cache_memory_mb=1)
    large = _load(root, tmp_path / "cache", cache="auto", cache_memory_mb=0)
    assert isinstance(small.train.store, stores.ArrayStore)
    assert isinstance(large.train.store, stores.CacheStore)


@pytest.mark.parametrize("mode", ["off", "disk"])
def test_workers_read_only_their_own_files(tmp_path, mode):
    root = _make_folder(tmp_path / "data", per_class=4)
    source = _load(root, tmp_path / "cache", cache=mode)
    positions = source.train.positions
    # Shard 1's files (its rows of the cache) broken after loading: shard 0 never
    # reads them.
    shard_one = positions[: len(positions) // 2 * 2][1::2]
    shard_zero = positions[: len(positions) // 2 * 2][0::2]
    expected = source.train.subset(np.searchsorted(positions, shard_zero))
    expected_images = expected.load_images()
    for position in shard_one:
        if mode == "off":
            with open(source.train.store.paths[position], "wb") as file:
                file.write(b"broken")
        else:
            with open(stores.cache_file(source.train.store.directory), "r+b") as rows:
                rows.seek(int(position) * stores.cached_bytes(SIZE))
                rows.write(b"\xff" * stores.cached_bytes(SIZE))
    images, labels = _stream(source.train, shard=(2, 0), batches=3, batch_size=2)
    assert sorted(labels[: len(shard_zero)].tolist()) == sorted(expected.labels.tolist())
    read = {image.tobytes() for image in images[: len(shard_zero)]}
    assert read == {image.tobytes() for image in expected_images}


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
    # The service's workers read the cache through a memory map, not this process's
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


def test_a_cached_stream_reuses_a_batchs_memory_only_once_it_is_released(tmp_path):
    import gc

    root = _make_folder(tmp_path / "data")
    streams = {}
    for mode in ("disk", "memory"):
        split = _load(root, tmp_path / "cache", cache=mode).train
        options = pipeline.PipelineOptions(deterministic=True)
        dataset = pipeline.make_dataset(
            split, batch_size=4, is_training=True, seed=1, options=options
        )
        # Held while the stream goes on: 30 batches, more than the pool keeps.
        streams[mode] = [images for images, _ in dataset.take(30).as_numpy_iterator()]
    for disk_batch, memory_batch in zip(streams["disk"], streams["memory"], strict=True):
        np.testing.assert_array_equal(disk_batch, memory_batch)
    del streams, disk_batch, memory_batch
    gc.collect()
    # Released, the batches' buffers wait for the next ones.
    assert stores._BATCH_BUFFERS.free[(4, SIZE, SIZE, 3)]


def test_processes_sharing_a_cache_decode_its_chunks_between_them(tmp_path):

    root = _make_folder(tmp_path / "data", per_class=120)
    expected = _load(root, tmp_path / "memory", cache="memory").train.images
    cache_root = tmp_path / "cache"
    go = tmp_path / "go"

    def program(me, other, index):
        return textwrap.dedent(
            f"""
            import json, os, time
            import numpy as np
            from absl import logging
            from effpipe import config
            from effpipe.data import cache, sources
            logging.set_verbosity(logging.INFO)
            cache.CHUNK_IMAGES = 30  # 12 chunks of the 360 images
            decoded, rounds, decode_claimed = [], [], cache._decode_claimed

            def counted(encoded, size, crop, directory, labels, chunks, claimed, progress, **tag):
                # Called with the chunks this process claimed in one round.
                if encoded.name == "folder-train":
                    rounds.append(len(claimed))
                    decoded.extend(chunks[k] for k, _, _ in claimed)
                    if len(rounds) == 2:
                        # Each waits for the other's first round before its second,
                        # so that both decode some whatever the order they start in.
                        deadline = time.monotonic() + 120
                        while not os.path.exists("{tmp_path}/{other}-1"):
                            assert time.monotonic() < deadline
                            time.sleep(0.05)
                    open("{tmp_path}/{me}-1", "w").close()
                decode_claimed(
                    encoded, size, crop, directory, labels, chunks, claimed, progress, **tag
                )

            cache._decode_claimed = counted
            data = config.DataConfig(dataset="folder:{root}", cache="disk")
            while not os.path.exists("{go}"):
                time.sleep(0.05)
            source = sources.load_configured_source(
                data, size={SIZE}, seed=0, cache_root="{cache_root}", workers=(2, {index})
            )
            np.save("{tmp_path}/{me}.npy", source.train.images)
            with open("{tmp_path}/{me}.json", "w") as file:
                json.dump(decoded, file)
            """
        )

    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", program(me, other, index)], stderr=open(logs[me], "w")
        )
        for index, (me, other) in enumerate((("a", "b"), ("b", "a")))
    ]
    go.touch()
    for process, name in zip(processes, ("a", "b")):
        # A bound against hanging for ever, not a measure of speed.
        assert process.wait(timeout=300) == 0, logs[name].read_text()[-3000:]
    chunks = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")}
    # Each decoded a share, and every chunk was decoded once.
    assert chunks["a"] and chunks["b"], chunks
    assert sorted(map(tuple, chunks["a"] + chunks["b"])) == [
        (start, start + 30) for start in range(0, 360, 30)
    ]
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), expected)
    assert "decoded 360 folder-train images" not in logs["a"].read_text() + logs["b"].read_text()


def test_a_chunk_whose_holder_ended_before_completing_it_is_decoded_by_a_waiting_process(
    tmp_path, monkeypatch
):
    import fcntl
    import time

    root = _make_folder(tmp_path / "data", per_class=40)
    expected = _load(root, tmp_path / "memory", cache="memory").train.images
    # The cache's folder name depends on the files and the chunks, not on where the
    # caches are.
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 30)
    _load(root, tmp_path / "elsewhere", cache="disk")
    [name] = _cache_folders(tmp_path / "elsewhere")
    cache_root = tmp_path / "cache"
    program = textwrap.dedent(
        f"""
        import numpy as np
        from absl import logging
        from effpipe import config
        from effpipe.data import cache, sources
        logging.set_verbosity(logging.INFO)
        cache.CHUNK_IMAGES = 30  # 4 chunks of the 120 images
        data = config.DataConfig(dataset="folder:{root}", cache="disk")
        source = sources.load_configured_source(
            data, size={SIZE}, seed=0, cache_root="{cache_root}"
        )
        np.save("{tmp_path / "images.npy"}", source.train.images)
        """
    )
    directory = cache_root / name
    directory.mkdir(parents=True)
    stderr = tmp_path / "stderr.txt"
    # This process holds chunk 2, as another worker decoding it would.
    with open(cache._chunk_file(str(directory), 2, ".lock"), "a") as lock, open(stderr, "w") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-c", program], stderr=log)
        # A bound against hanging for ever, not a measure of speed.
        deadline = time.monotonic() + 300
        while "waiting for 1 chunks" not in stderr.read_text():
            assert second.poll() is None, stderr.read_text()[-2000:]
            assert time.monotonic() < deadline, stderr.read_text()[-2000:]
            time.sleep(0.2)
        # The other three are complete; chunk 2 is not, and its holder ends without it.
        tag = _allocation_tag(directory)
        assert [cache._chunk_complete(str(directory), k, tag) for k in range(4)] == [
            True, True, False, True
        ]  # fmt: skip
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert second.wait(timeout=300) == 0, stderr.read_text()[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)
    assert (directory / cache.MANIFEST_FILE).is_file()


def test_a_complete_cache_whose_file_was_cut_short_is_decoded_again(tmp_path):
    root = _make_folder(tmp_path / "data")
    first = _load(root, tmp_path / "cache", cache="disk").train
    with open(stores.cache_file(first.store.directory), "r+b") as rows:
        rows.truncate(100)
    again = _load(root, tmp_path / "cache", cache="disk").train
    np.testing.assert_array_equal(again.images, first.images)


def test_a_writer_that_started_alongside_is_found_before_the_manifest(tmp_path, monkeypatch):
    # On a shared filesystem whose flock holds on one machine only, a process on
    # another machine can start writing the same cache: the one that finds another
    # writer's token in place of its own does not mark the cache complete.
    root = _make_folder(tmp_path / "data")
    first_pass = cache._decode_chunks

    def with_another_writer(encoded, size, crop, directory, *args, **kwargs):
        first_pass(encoded, size, crop, directory, *args, **kwargs)
        with open(os.path.join(directory, cache.ALLOCATION_FILE), "w") as file:
            file.write("other-host pid 7 0123abcd")

    monkeypatch.setattr(cache, "_decode_chunks", with_another_writer)
    with pytest.raises(
        UsageError, match=r"another process \(other-host pid 7\) started the decoded cache"
    ):
        _load(root, tmp_path / "cache", cache="disk")
    [name] = _cache_folders(tmp_path / "cache")
    folder = tmp_path / "cache" / name
    assert not (folder / cache.MANIFEST_FILE).exists()
    monkeypatch.setattr(cache, "_decode_chunks", first_pass)
    # The rerun completes the cache in the other's allocation.
    again = _load(root, tmp_path / "cache", cache="disk").train
    memory = _load(root, tmp_path / "memory", cache="memory").train
    np.testing.assert_array_equal(again.images, memory.images)
    assert (folder / cache.MANIFEST_FILE).is_file()


def test_a_process_that_allocated_the_file_again_does_not_take_the_others_chunks(
    tmp_path, monkeypatch
):
    # Where the folder's lock holds on one machine only, a process on another machine
    # can allocate the file again (zeroing it, removing the chunks' files) while this
    # one decodes a chunk: this one's file for that chunk, written afterwards, names
    # rows that are now zeros. The other process must decode that chunk itself.
    root = _make_folder(tmp_path / "data", per_class=40)
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 30)  # 4 chunks of the 120 images
    monkeypatch.setattr(cache, "MAX_CLAIM", 1)
    monkeypatch.setattr(cache, "PASS_BATCH", 8)
    writes, write = [], cache._RowWriter.write

    def allocated_again_midway(writer, positions, images):
        write(writer, positions, images)
        writes.append(positions.min())
        if len(writes) == 6:  # Inside chunk 1, rows 30 to 59.
            assert 30 <= writes[-1] < 60
            directory = os.path.dirname(writer.path)
            os.remove(os.path.join(directory, cache.ALLOCATION_FILE))
            encoded = cache.EncodedSplit("folder-train", 120, "", None, True, str)
            cache._allocated(encoded, SIZE, directory)

    monkeypatch.setattr(cache._RowWriter, "write", allocated_again_midway)
    with pytest.raises(UsageError, match="another process .* started the decoded cache"):
        _load(root, tmp_path / "cache", cache="disk")
    monkeypatch.setattr(cache._RowWriter, "write", write)
    # The other process's pass, in the allocation it made.
    again = _load(root, tmp_path / "cache", cache="disk").train
    memory = _load(root, tmp_path / "memory", cache="memory").train
    np.testing.assert_array_equal(again.images, memory.images)


def test_the_log_names_a_row_only_once_the_row_is_on_the_disk(tmp_path, monkeypatch):
    # After a power loss the rerun keeps the rows the log names: each must have been
    # fdatasynced after it was written and before its position was logged.
    root = _make_folder(tmp_path / "data", per_class=200)
    events, lock = [], threading.Lock()
    pwrite, fdatasync, write = os.pwrite, os.fdatasync, os.write

    def path_of(descriptor):
        return os.readlink(f"/proc/self/fd/{descriptor}")

    def recorded(kind, function):
        def call(descriptor, *args):
            result = function(descriptor, *args)
            with lock:
                events.append((kind, path_of(descriptor), args))
            return result

        return call

    monkeypatch.setattr(os, "pwrite", recorded("pwrite", pwrite))
    monkeypatch.setattr(os, "fdatasync", recorded("fdatasync", fdatasync))
    monkeypatch.setattr(os, "write", recorded("write", write))
    monkeypatch.setattr(cache, "PASS_BATCH", 32)
    split = _load(root, tmp_path / "cache", cache="disk").train
    row = stores.cached_bytes(SIZE)
    written_at, synced, logged = {}, -1, set()
    for index, (kind, path, args) in enumerate(events):
        if kind == "pwrite" and path.endswith(stores.CACHE_FILE):
            written_at[args[1] // row] = index
        elif kind == "fdatasync" and path.endswith(stores.CACHE_FILE):
            synced = index
        elif kind == "write" and os.path.basename(path).startswith(cache.CHUNK_PREFIX):
            for position in np.frombuffer(args[0], "<i8").tolist():
                assert written_at[position] < synced, position
                logged.add(position)
    assert logged == set(range(len(split))) and len(split) == 600


def test_after_a_failed_sync_the_writer_logs_no_row(tmp_path, monkeypatch):
    # The kernel reports a writeback error once: a sync after a failed one can succeed
    # though rows were lost, so nothing may be logged after a failure.
    directory = tmp_path / "cache"
    directory.mkdir()
    row = stores.cached_bytes(SIZE)
    cache._allocate_rows(str(directory), stores.cache_file(str(directory)), 8 * row)
    writer = cache._RowWriter(str(directory), SIZE, [0])
    log = str(directory / "chunk-000.i64")
    writer.add_log(0, log)
    fdatasync, failures = os.fdatasync, [OSError(5, "Input/output error")]

    def fails_once(descriptor):
        if failures:
            raise failures.pop()
        fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", fails_once)
    images = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    try:
        writer.write(np.array([0, 1]), images)
        with pytest.raises(OSError, match="Input/output"):
            writer.sync()
        writer.write(np.array([2, 3]), images)
        writer.sync()
    finally:
        writer.close()
    assert not failures and os.path.getsize(log) == 0


def test_a_pass_over_more_chunks_than_one_pipeline_takes_claims_them_in_rounds(
    tmp_path, monkeypatch
):
    # A pipeline holds two descriptors per chunk it decodes: one takes MAX_CLAIM at most.
    root = _make_folder(tmp_path / "data", per_class=40)
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 10)  # 12 chunks of the 120 images
    monkeypatch.setattr(cache, "MAX_CLAIM", 5)
    rounds, decode_claimed = [], cache._decode_claimed

    def recorded(encoded, size, crop, directory, labels, chunks, claimed, progress, **tag):
        if encoded.name == "folder-train":
            rounds.append([k for k, _, _ in claimed])
        return decode_claimed(
            encoded, size, crop, directory, labels, chunks, claimed, progress, **tag
        )

    monkeypatch.setattr(cache, "_decode_claimed", recorded)
    split = _load(root, tmp_path / "cache", cache="disk").train
    assert rounds == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    expected = _load(root, tmp_path / "memory", cache="memory").train
    np.testing.assert_array_equal(split.images, expected.images)
    np.testing.assert_array_equal(split.labels, expected.labels)
