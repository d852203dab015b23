"""Atomic writes: a crash mid-write leaves the previous file, and no stray temporary."""

import json
import os
import pathlib

import pytest

from effpipe import run_dir


def test_a_crash_during_a_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "metrics.json"
    run_dir.write_json(path, {"top1": 0.5})

    def crashing_writer(temporary_path):
        with open(temporary_path, "w") as file:
            file.write('{"top1": 0.')  # Half a file, then the crash.
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dir.write_atomically(str(path), crashing_writer)
    assert json.loads(path.read_text()) == {"top1": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_write_creates_its_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "flags.txt"
    run_dir.write_text(str(path), "--seed=1\n")
    run_dir.write_text(str(path), "--seed=2\n")
    assert path.read_text() == "--seed=2\n"
    assert os.listdir(path.parent) == ["flags.txt"]


def test_a_crash_while_writing_a_folder_leaves_the_previous_folder_intact(tmp_path):
    target = tmp_path / "export"

    def write(version):
        def fill(folder):
            (pathlib.Path(folder) / "saved_model.pb").write_text(version)
            if version == "crash":
                raise OSError("disk full")

        return fill

    run_dir.write_directory_atomically(str(target), write("one"))
    run_dir.write_directory_atomically(str(target), write("two"))
    assert (target / "saved_model.pb").read_text() == "two"
    with pytest.raises(OSError, match="disk full"):
        run_dir.write_directory_atomically(str(target), write("crash"))
    assert (target / "saved_model.pb").read_text() == "two"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
