"""A full disk while writing the resume state, a checkpoint, the decoded cache or the
export: one line naming the file, the space it needs and the space free; what was
there before is intact; the binary exits with status 2.

The real disk-full errors come from a small tmpfs the test mounts (as root, which the
CI machines are; elsewhere those tests are skipped). The trainer's own run uses the
fault-injection variable run_dir.DISK_FULL_ENV, which makes one named write fail as
a full disk would.
"""

import errno
import json
import os
import subprocess
import uuid

import image_files
import keras
import numpy as np
import pytest
import tensorflow as tf
from binaries import run_train

from effpipe import config, errors, run_dir
from effpipe.data import cache_files, sources, stores
from effpipe.training import checkpoints, run_state


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs under tmp_path: writes past that fail with ENOSPC."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk, leave_bytes):
    """Fills `disk` up to `leave_bytes` of free space."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as file:
        file.write(b"\0" * max(free - leave_bytes, 0))


def _leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith(run_dir.TEMPORARY_PREFIX)]


def test_a_full_disk_while_writing_a_file_keeps_the_previous_one(small_disk):
    path = small_disk / "state.json"
    run_dir.write_json(str(path), {"epochs_done": 1})
    with pytest.raises(errors.DiskFullError) as raised:
        run_dir.write_text(str(path), "x" * 3 * 2**20)
    message = str(raised.value)
    assert str(path) in message and "MB are free there" in message, message
    assert "at least" in message and "The previous state.json is intact" in message
    assert "\n" not in message
    assert json.loads(path.read_text()) == {"epochs_done": 1}
    assert _leftovers(small_disk) == []


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(small_disk):
    # Keras' weights file through h5py: its own words for ENOSPC, not an errno.
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1024)])
    path = small_disk / "best.weights.h5"
    checkpoint = checkpoints.BestCheckpoint(str(path))
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.5})
    saved = path.read_bytes()
    _fill(small_disk, leave_bytes=64 * 1024)
    model.layers[-1].kernel.assign(np.ones((64, 1024), np.float32))
    with pytest.raises(errors.DiskFullError, match="best.weights.h5: writing it needs about"):
        checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": 0.7})
    assert path.read_bytes() == saved and checkpoint.best == 0.5
    assert _leftovers(small_disk) == []


def test_a_full_disk_while_exporting_leaves_no_half_saved_model(small_disk):
    module = tf.Module()
    module.table = tf.Variable(tf.zeros((1024, 1024)))  # 4 MiB of float32.
    path = small_disk / "export"
    with pytest.raises(errors.DiskFullError) as raised:
        run_dir.write_directory_atomically(
            str(path), lambda folder: tf.saved_model.save(module, folder)
        )
    assert "Nothing half-written is left" in str(raised.value)
    assert os.listdir(small_disk) == []


def _first_pass_on(disk, photos):
    layout = {"train": {name: [f"{i:03d}.jpg" for i in range(40)] for name in ("ant", "bee")}}
    image_files.write_class_folder_tree(photos, layout)
    data = config.DataConfig(dataset=f"folder:{photos}", cache="disk")
    with pytest.raises(errors.DiskFullError) as raised:
        # 80 images of 96 x 96 x 3 bytes: 2.2 MB, twice the disk.
        sources.load_configured_source(data, size=96, seed=0, cache_root=str(disk))
    # Not marked complete: a rerun resumes the cache instead of trusting it.
    assert not list(disk.rglob("manifest.json"))
    return str(raised.value)


def test_a_disk_too_small_for_the_cache_stops_the_first_pass_before_decoding(tmp_path, small_disk):
    message = _first_pass_on(small_disk, tmp_path / "photos")
    assert str(small_disk) in message and "about 2.1 MB" in message, message
    assert "Nothing was decoded yet" in message
    # The allocation that failed is not left taking the space.
    assert not list(small_disk.rglob(stores.CACHE_FILE))


def test_a_full_disk_during_the_first_pass_keeps_what_it_wrote(tmp_path, small_disk, monkeypatch):
    # A filesystem that cannot allocate ahead: the writes themselves find it full.
    def cannot_allocate(descriptor, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", cannot_allocate)
    message = _first_pass_on(small_disk, tmp_path / "photos")
    assert stores.CACHE_FILE in message and "the rerun resumes the cache" in message, message
    assert "\n" not in message


def test_a_full_disk_is_not_taken_for_the_device_running_out_of_memory():
    full = tf.errors.ResourceExhaustedError(
        None, None, "/w/export/variables: No space left on device"
    )
    assert errors.is_disk_full(full) and not errors.is_out_of_memory(full)
    assert errors.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert errors.is_out_of_memory(oom) and not errors.is_disk_full(oom)


def test_a_full_disk_while_saving_the_state_stops_the_run_in_one_line(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv(run_dir.DISK_FULL_ENV, "epoch-0002.weights.h5")
    result = run_train(
        "--flagfile=flags/smoke.flags", "--image_size=32", "--phase1_epochs=3",
        "--phase2_epochs=0", "--noexport", f"--workdir={workdir}", timeout_sec=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("effpipe.train: error: no space left on the disk of "), last_line
    assert "epoch-0002.weights.h5" in last_line and "rerun the same command" in last_line
    assert "Traceback" not in result.stderr
    # The state of epoch 1 is the one to resume from, whole; nothing half-written.
    state = run_state.load_state(str(workdir))
    assert state.epochs_done == 1 and state.weights_file == "epoch-0001.weights.h5"
    assert _leftovers(workdir / "state") == []


def test_a_write_cut_short_is_a_full_disk_and_its_row_is_not_logged(tmp_path, monkeypatch):
    # A filesystem that cannot allocate ahead writes what fits and returns the count.
    written = os.pwrite

    def cut_short(descriptor, data, offset):
        return written(descriptor, bytes(data)[:100], offset)

    monkeypatch.setattr(os, "pwrite", cut_short)
    message = _first_pass_on(tmp_path / "cache", tmp_path / "photos")
    assert stores.CACHE_FILE in message and "the rerun resumes the cache" in message, message
    # The batch whose write was cut short is not in the progress log.
    [log] = (tmp_path / "cache").rglob(cache_files.PROGRESS_FILE)
    assert log.stat().st_size == 0
