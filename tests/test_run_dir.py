"""The run directory: same flags resume, other flags are refused or overwritten; and
atomic writes: a crash mid-write leaves the previous file, and no stray temporary; one
run at a time: the directory's lock."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from binaries import REPO_ROOT, run_train

from effpipe import config as config_lib
from effpipe import run_dir
from effpipe.config import TrainConfig
from effpipe.errors import UsageError

CONFIG = TrainConfig.from_flat(dataset="shapes", variant="b0", weights="none")


def test_a_new_directory_records_the_config_and_the_same_flags_resume(tmp_path):
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.NEW
    assert (tmp_path / run_dir.CONFIG_FILE).is_file()
    (tmp_path / "state").mkdir()  # An epoch completed.
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.RESUME
    (tmp_path / "metrics.json").write_text("{}")
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.COMPLETE


def test_other_flags_are_refused_naming_them_unless_overwrite(tmp_path):
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    (tmp_path / "state").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    other = CONFIG.replace(batch_size=64)
    with pytest.raises(UsageError, match="--batch_size: 32 there, 64 now.*--overwrite"):
        run_dir.prepare(str(tmp_path), other, overwrite=False)
    assert run_dir.prepare(str(tmp_path), other, overwrite=True) == run_dir.NEW
    # The old run's outputs are gone; files effpipe did not write are kept.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "notes.txt"]


def test_outputs_without_a_config_are_refused(tmp_path):
    (tmp_path / "history.json").write_text("{}")
    with pytest.raises(UsageError, match="without its config.json"):
        run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)


def test_a_run_that_failed_before_its_first_epoch_takes_corrected_flags(tmp_path):
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    (tmp_path / "flags.txt").write_text("--batch_size=32\n")
    corrected = CONFIG.replace(batch_size=8)
    assert run_dir.prepare(str(tmp_path), corrected, overwrite=False) == run_dir.NEW


def test_a_new_run_and_overwrite_keep_the_decoded_image_cache(tmp_path):
    # A run killed in its first pass or first epoch (no state yet): the rerun is a new
    # run, and resumes the first pass from the decoded images already on the disk.
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    images = (
        tmp_path / run_dir.IMAGE_CACHE_DIR / "folder-train-224px-resize-0123" / "progress.jsonl"
    )
    images.parent.mkdir(parents=True)
    images.write_bytes(b"\0" * 8)
    features = tmp_path / run_dir.FEATURE_CACHE_FILE
    features.write_bytes(b"features")
    (tmp_path / "tensorboard").mkdir()
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.NEW
    assert images.is_file() and not features.exists()
    assert not (tmp_path / "tensorboard").exists()
    # --overwrite discards a finished run's outputs, not the decoded images.
    (tmp_path / "state").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    features.write_bytes(b"features")
    other = CONFIG.replace(batch_size=64)
    assert run_dir.prepare(str(tmp_path), other, overwrite=True) == run_dir.NEW
    assert images.is_file() and not features.exists()
    assert not (tmp_path / "state").exists() and not (tmp_path / "metrics.json").exists()


def test_a_workdir_holding_only_decoded_images_is_a_new_run(tmp_path):
    # Another worker of a multi-worker run may start decoding into the shared
    # WORKDIR/cache/images before the chief prepares the directory.
    (tmp_path / run_dir.IMAGE_CACHE_DIR / "folder-train-224px-resize-0123").mkdir(parents=True)
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.NEW
    assert (tmp_path / run_dir.IMAGE_CACHE_DIR / "folder-train-224px-resize-0123").is_dir()


def test_half_written_files_of_a_killed_run_are_removed(tmp_path):
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    (tmp_path / "state").mkdir()
    stray = tmp_path / "state" / ".tmp-abc.epoch-0002.weights.h5"
    stray.write_bytes(b"half")
    half_export = tmp_path / ".tmp-export-x1y2"  # A folder written atomically.
    (half_export / "variables").mkdir(parents=True)
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.RESUME
    assert not stray.exists() and not half_export.exists()


def test_an_unfinished_run_resumes_with_a_lower_learning_rate(tmp_path):
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    (tmp_path / "state").mkdir()
    lower = CONFIG.replace(phase2_learning_rate=1e-6, data_threads=2)
    assert run_dir.prepare(str(tmp_path), lower, overwrite=False) == run_dir.RESUME
    # config.json now holds the values the run goes on with.
    assert run_dir.prepare(str(tmp_path), lower, overwrite=False) == run_dir.RESUME
    # A finished run is another matter: its results came from the old values.
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(UsageError, match="--phase2_learning_rate"):
        run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)


def test_a_run_recorded_with_the_notebook_heads_older_name_resumes(tmp_path):
    notebook = CONFIG.replace(head="notebook")
    run_dir.prepare(str(tmp_path), notebook, overwrite=False)
    (tmp_path / "state").mkdir()
    recorded = run_dir.read_json(str(tmp_path / run_dir.CONFIG_FILE))
    run_dir.write_json(str(tmp_path / run_dir.CONFIG_FILE), {**recorded, "head": "seed"})
    assert run_dir.prepare(str(tmp_path), notebook, overwrite=False) == run_dir.RESUME


@pytest.mark.parametrize("dataset, resumes", [("cifar100", True), ("folder:/photos", False)])
def test_a_run_recorded_before_the_decoded_cache_resumes_where_it_means_the_same(
    tmp_path, dataset, resumes
):
    current = CONFIG.replace(dataset=dataset)
    run_dir.prepare(str(tmp_path), current, overwrite=False)
    (tmp_path / "state").mkdir()
    recorded = run_dir.read_json(str(tmp_path / run_dir.CONFIG_FILE))
    for name in config_lib.OLDER_RUN_DATA_FIELDS:
        del recorded[name]
    # The older default, 32 px: CIFAR's own size, but not a folder's model resolution.
    run_dir.write_json(str(tmp_path / run_dir.CONFIG_FILE), {**recorded, "source_size": 32})
    if resumes:
        assert run_dir.prepare(str(tmp_path), current, overwrite=False) == run_dir.RESUME
    else:
        with pytest.raises(UsageError, match="--source_size: 32 there, 0 now"):
            run_dir.prepare(str(tmp_path), current, overwrite=False)


def test_a_run_recorded_before_the_schedules_resumes_as_constant_adam(tmp_path):
    run_dir.prepare(str(tmp_path), CONFIG, overwrite=False)
    (tmp_path / "state").mkdir()
    recorded = run_dir.read_json(str(tmp_path / run_dir.CONFIG_FILE))
    for name in config_lib.OLDER_RUN_RECIPE_FIELDS:
        del recorded[name]
    run_dir.write_json(str(tmp_path / run_dir.CONFIG_FILE), recorded)
    assert run_dir.prepare(str(tmp_path), CONFIG, overwrite=False) == run_dir.RESUME
    # The recipe it recorded is constant Adam: a schedule is another run.
    with pytest.raises(UsageError, match="--lr_schedule: 'constant' there, 'cosine' now"):
        run_dir.prepare(str(tmp_path), CONFIG.replace(lr_schedule="cosine"), overwrite=False)


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_a_run_recorded_before_the_from_scratch_fields_resumes_as_keras_built_it(tmp_path, weights):
    current = CONFIG.replace(weights=weights)
    run_dir.prepare(str(tmp_path), current, overwrite=False)
    (tmp_path / "state").mkdir()
    recorded = run_dir.read_json(str(tmp_path / run_dir.CONFIG_FILE))
    for name in config_lib.OLDER_RUN_INIT_FIELDS:
        del recorded[name]
    run_dir.write_json(str(tmp_path / run_dir.CONFIG_FILE), recorded)
    # Its base was Keras' own (stochastic depth 0.2); the initialisation is history
    # once weights are saved, so the new default resumes it.
    assert run_dir.prepare(str(tmp_path), current, overwrite=False) == run_dir.RESUME
    if weights == "none":
        with pytest.raises(UsageError, match="--stochastic_depth: 0.2 there, 0.0 now"):
            run_dir.prepare(str(tmp_path), current.replace(stochastic_depth=0.0), overwrite=False)
    # Finished, a pretrained run reads as today's: it is complete, not another run.
    (tmp_path / "metrics.json").write_text("{}")
    run_dir.write_json(str(tmp_path / run_dir.CONFIG_FILE), recorded)
    if weights == "imagenet":
        assert run_dir.prepare(str(tmp_path), current, overwrite=False) == run_dir.COMPLETE
    else:
        with pytest.raises(UsageError, match="--zero_init_residual: False there, True now"):
            run_dir.prepare(str(tmp_path), current, overwrite=False)


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


_HOLD_AND_WAIT = """
import sys, time
from effpipe import run_dir
run_dir.hold(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir):
    """A process that holds `workdir`'s lock until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_WAIT, str(workdir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_on_a_held_workdir_stops_in_one_line_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = _holder(workdir)
    try:
        result = run_train("--flagfile=flags/smoke.flags", f"--workdir={workdir}", timeout_sec=120)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("effpipe.train:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert f"--workdir={workdir} is in use by another effpipe run" in lines[0]
        assert f"PID {holder.pid} on {socket.gethostname()}" in lines[0]
        # Refused before anything was written; the holder is unharmed.
        assert sorted(path.name for path in workdir.iterdir()) == [run_dir.LOCK_FILE]
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left no stale lock: the next process takes it at once.
    successor = _holder(workdir)
    successor.kill()
    successor.wait()


def test_the_same_process_may_take_its_own_lock_again(tmp_path):
    run_dir.hold(str(tmp_path / "run"))
    run_dir.hold(str(tmp_path / "run"))
    assert (tmp_path / "run" / run_dir.LOCK_FILE).read_text().startswith("PID ")
