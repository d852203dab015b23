"""Bad input to every binary: one line on stderr naming the value and the fix, exit 2.

One table, one subprocess per case, run as a user runs the binary (from the repo
root). Each case's line must start with "<binary>: error:", name the bad value and
the fix; stderr must hold no traceback; and whatever the binary writes must not be
half-written (see `_check_outputs`). TensorFlow's own start-up log lines may precede
the error line.

Most cases are refused while the flags are read, in a fraction of a second; the
cases marked PREPARED are found by the trainer after TensorFlow loads, before any
training step (10-25 s each on a loaded 2-core machine).
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Callable

import image_files
import pytest

from effpipe import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
# A hang guard far above any case's duration on a loaded 2-core machine: a binary that
# hangs fails its case with what it printed instead of blocking the suite.
HANG_GUARD_SEC = 300

# What a binary may have written when it stops on bad input, per binary: the output
# flag each case gets (a path under the case's tmp folder) unless it passes its own.
OUTPUT_FLAGS = {
    "train": ("--workdir", "run"),
    "evaluate": ("--output_dir", "out"),
    "tune_batch": ("--output", "tuned.flags"),
}
# What effpipe.train writes before the trainer starts (train.py: run_dir.hold takes
# the lock, run_dir.prepare writes config.json, then flags.txt): all a workdir may
# hold after bad input the trainer finds; no history, metrics, checkpoints, resume
# state, cache, TensorBoard log or export.
PREPARED = frozenset({".effpipe.lock", "config.json", "flags.txt"})
# Bad input found while the flags are read: nothing is created.
ABSENT = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
      binary: the module under effpipe (`python -m effpipe.BINARY`).
      args: its arguments; {tmp} is the case's tmp folder, {port} the port of the
        socket `setup` returned, else a free port.
      value: the bad value, as the error line names it.
      fix: the fix, as the error line names it.
      setup: writes the case's files into tmp; may return a listening socket, held
        during the run, whose port is {port}.
      leaves: what the output path may hold afterwards: ABSENT, or exactly these names.
    """

    binary: str
    args: tuple[str, ...]
    value: str
    fix: str
    setup: Callable | None = None
    leaves: frozenset | None = ABSENT


# --- Setups: the files (or the port) a case needs. ---


def _empty_folder(tmp):
    (tmp / "empty").mkdir()


def _test_only_folder(tmp):
    image_files.write_class_folder_tree(tmp / "test_only", {"test": {"cats": ["a.png"]}})


def _image_named_folder(tmp):
    # A class folder whose only "image" is a directory named like one: no file to read.
    image_files.write_class_folder_tree(tmp / "photos", {"train": {"cats": ["a.png"]}})
    (tmp / "photos" / "train" / "dogs" / "b.jpg").mkdir(parents=True)


def _truncated_jpeg_folder(tmp):
    # Root reads every file whatever its mode, so unreadable means undecodable here:
    # an interrupted copy, the JPEG header whole and half the scan data missing.
    image_files.write_class_folder_tree(
        tmp / "photos",
        {
            "train": {
                "cats": ["a.png", ("b.jpg", image_files.write_truncated_jpeg)],
                "dogs": ["c.png"],
            }
        },
    )


def _text_weights_file(tmp):
    (tmp / "x.weights.h5").write_text("not a weights file\n")


def _b1_weights_file(tmp):
    from effpipe.model import efficientnet

    efficientnet.make_base("b1", 32, "none").save_weights(str(tmp / "b1_notop.weights.h5"))


def _flagfile_with_bad_value(tmp):
    (tmp / "bad.flags").write_text("# A recipe with a typo.\n--batch_size=0\n")


def _file_in_the_way(tmp):
    (tmp / "a_file").write_text("not a directory\n")


def _unfinished_run(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text(json.dumps(config_lib.TrainConfig().to_flat()))


def _finished_run_without_export(tmp):
    _unfinished_run(tmp)
    (tmp / "run" / "metrics.json").write_text("{}\n")


def _port_in_use(tmp):
    """A socket listening on every interface; the test closes it after the run."""
    holder = socket.socket()
    holder.bind(("", 0))
    holder.listen()
    return holder


SMOKE = "--flagfile=flags/smoke.flags"
NOT_URL = "must be grpc://HOST:PORT"

CASES = {
    # --- effpipe.train: flags and flagfiles, refused before anything is written. ---
    "train-variant-b9": Case("train", ("--variant=b9",), "--variant=b9", "one of <b0|b1|"),
    "train-batch_size-0": Case("train", ("--batch_size=0",), "--batch_size=0", "at least 1"),
    "train-batch_size-many": Case(
        "train", ("--batch_size=many",), "--batch_size=many", "pass a whole number"
    ),
    "train-phase1_epochs--2": Case(
        "train", ("--phase1_epochs=-2",), "--phase1_epochs=-2", "must be 0 or more"
    ),
    "train-phase2_learning_rate-0": Case(
        "train", ("--phase2_learning_rate=0",), "--phase2_learning_rate=0", "must be positive"
    ),
    "train-label_smoothing-1": Case(
        "train", ("--label_smoothing=1",), "--label_smoothing=1", "must be in [0, 1)"
    ),
    "train-weight_decay-with-adam": Case(
        "train",
        ("--weight_decay=0.1", "--optimizer=adam"),
        "--weight_decay=0.1",
        "needs --optimizer=adamw",
    ),
    "train-image_size-8": Case(
        "train", ("--image_size=8",), "--image_size=8", "use 0 for the variant's native size"
    ),
    "train-image_size-5000": Case(
        "train", ("--image_size=5000",), "--image_size=5000", "or 32..1024 pixels"
    ),
    "train-dropout-1": Case("train", ("--dropout=1",), "--dropout=1", "must be in [0, 1)"),
    "train-source_size-4": Case(
        "train", ("--source_size=4",), "--source_size=4", "use 0 (auto) or 8..1024 pixels"
    ),
    "train-validation_fraction-1": Case(
        "train",
        ("--validation_fraction=1",),
        "--validation_fraction=1",
        "must be strictly between 0 and 1",
    ),
    "train-shapes_num_classes-11": Case(
        "train", ("--shapes_num_classes=11",), "--shapes_num_classes=11", "must be in 2..10"
    ),
    "train-shapes_train_examples-5": Case(
        "train",
        ("--shapes_train_examples=5",),
        "--shapes_train_examples=5",
        "raise them, or lower --shapes_num_classes",
    ),
    "train-dataset-imagenet": Case(
        "train",
        ("--dataset=imagenet",),
        "unknown dataset 'imagenet'",
        "choose one of cifar100, shapes, folder:PATH",
    ),
    "train-dataset-folder-without-path": Case(
        "train", ("--dataset=folder:",), "unknown dataset 'folder:'", "choose one of"
    ),
    "train-zoom_fraction-1.5": Case(
        "train", ("--zoom_fraction=1.5",), "--zoom_fraction=1.5", "must be in [0, 1)"
    ),
    "train-shear_degrees-90": Case(
        "train", ("--shear_degrees=90",), "--shear_degrees=90", "must be in [0, 90)"
    ),
    "train-fill_mode-wrap": Case(
        "train", ("--fill_mode=wrap",), "--fill_mode=wrap", "one of <nearest|reflect|constant>"
    ),
    "train-profile_steps-5": Case(
        "train", ("--profile_steps=5",), "--profile_steps=5 must be START,END", "(e.g. 10,20)"
    ),
    "train-profile_steps-3,2": Case(
        "train", ("--profile_steps=3,2",), "--profile_steps=3,2 must be START,END", "(e.g. 10,20)"
    ),
    "train-mixed_precision_dtype-half": Case(
        "train",
        ("--mixed_precision_dtype=half",),
        "--mixed_precision_dtype=half",
        "one of <auto|float16|bfloat16>",
    ),
    "train-mixed_precision_dtype-without-mixed_precision": Case(
        "train",
        ("--mixed_precision_dtype=float16",),
        "--mixed_precision_dtype=float16",
        "add --mixed_precision",
    ),
    "train-steps_per_execution--1": Case(
        "train",
        ("--steps_per_execution=-1",),
        "--steps_per_execution=-1",
        "must be 0 (auto) or more",
    ),
    "train-steps_per_execution-with-profile_steps": Case(
        "train",
        ("--steps_per_execution=2", "--profile_steps=1,2"),
        "could not trace exactly",
        "pass --steps_per_execution=0",
    ),
    "train-data_threads--1": Case(
        "train", ("--data_threads=-1",), "--data_threads=-1", "must be 0 or more"
    ),
    "train-data_service-not-a-url": Case(
        "train", ("--data_service=localhost:5050",), "--data_service=localhost:5050", NOT_URL
    ),
    "train-flagfile-missing": Case(
        "train",
        ("--flagfile={tmp}/missing.flags",),
        "missing.flags",
        "check the --flagfile path",
    ),
    "train-flagfile-with-batch_size-0": Case(
        "train",
        ("--flagfile={tmp}/bad.flags",),
        "--batch_size=0",
        "at least 1",
        setup=_flagfile_with_bad_value,
    ),
    "train-unexpected-argument": Case(
        "train", (SMOKE, "runs/x"), "unexpected arguments runs/x", "flags take --name=value"
    ),
    # --- effpipe.train: a workdir that cannot be made. ---
    "train-workdir-under-a-file": Case(
        "train",
        (SMOKE, "--workdir={tmp}/a_file/run"),
        "--workdir={tmp}/a_file/run cannot be created (Not a directory",
        "pick a directory path you can write to",
        setup=_file_in_the_way,
    ),
    "train-workdir-is-a-file": Case(
        "train",
        (SMOKE, "--workdir={tmp}/a_file"),
        "--workdir={tmp}/a_file cannot be created (File exists",
        "pick a directory path you can write to",
        setup=_file_in_the_way,
    ),
    # Tests run as root, whom file modes do not stop; the kernel's sysfs refuses new
    # folders to root too ("Operation not permitted", or a read-only file system).
    "train-workdir-unwritable": Case(
        "train",
        (SMOKE, "--workdir=/sys/effpipe-run"),
        "--workdir=/sys/effpipe-run cannot be created (",
        "pick a directory path you can write to",
    ),
    # --- effpipe.train: bad input the trainer finds, before training. ---
    "train-weights-missing": Case(
        "train",
        (SMOKE, "--weights={tmp}/missing.weights.h5"),
        "{tmp}/missing.weights.h5 does not exist",
        "pass --weights=imagenet, none or the path of a no-top weights file",
        leaves=PREPARED,
    ),
    "train-weights-not-a-weights-file": Case(
        "train",
        (SMOKE, "--weights={tmp}/x.weights.h5"),
        "weights file {tmp}/x.weights.h5 does not fit the b0 base",
        "pass the no-top weights of b0",
        setup=_text_weights_file,
        leaves=PREPARED,
    ),
    "train-weights-of-another-variant": Case(
        "train",
        (SMOKE, "--weights={tmp}/b1_notop.weights.h5"),
        "weights file {tmp}/b1_notop.weights.h5 does not fit the b0 base",
        "pass the no-top weights of b0",
        setup=_b1_weights_file,
        leaves=PREPARED,
    ),
    "train-unfreeze_blocks-17": Case(
        "train",
        (SMOKE, "--unfreeze_blocks=17"),
        "--unfreeze_blocks=17 is more than the 16 blocks",
        "use 0..16",
        leaves=PREPARED,
    ),
    "train-batch_size-above-the-examples": Case(
        "train",
        (SMOKE, "--shapes_train_examples=40", "--batch_size=64"),
        "--batch_size=64 is larger than the 36 training examples",
        "lower it",
        leaves=PREPARED,
    ),
    "train-folder-missing": Case(
        "train",
        (SMOKE, "--dataset=folder:{tmp}/nowhere"),
        "dataset folder {tmp}/nowhere does not exist",
        "check --dataset=folder:PATH",
        leaves=PREPARED,
    ),
    "train-folder-empty": Case(
        "train",
        (SMOKE, "--dataset=folder:{tmp}/empty"),
        "dataset folder {tmp}/empty has no train/ subfolder",
        "lay it out as PATH/train/<class>/<image files>",
        setup=_empty_folder,
        leaves=PREPARED,
    ),
    "train-folder-test-only": Case(
        "train",
        (SMOKE, "--dataset=folder:{tmp}/test_only"),
        "dataset folder {tmp}/test_only has no train/ subfolder",
        "lay it out as PATH/train/<class>/<image files>",
        setup=_test_only_folder,
        leaves=PREPARED,
    ),
    "train-folder-class-without-image-files": Case(
        "train",
        (SMOKE, "--dataset=folder:{tmp}/photos"),
        "class folder {tmp}/photos/train/dogs has no images",
        "add some or remove it",
        setup=_image_named_folder,
        leaves=PREPARED,
    ),
    "train-folder-undecodable-image": Case(
        "train",
        (SMOKE, "--dataset=folder:{tmp}/photos"),
        "cannot decode image {tmp}/photos/train/cats/b.jpg",
        "delete or replace the file, or pass --on_bad_image=skip",
        setup=_truncated_jpeg_folder,
        leaves=PREPARED,
    ),
    # Nothing listens there: TensorFlow's client alone would wait for ever. The line
    # says the bound the trainer waited ("within 10 s").
    "train-data_service-refused": Case(
        "train",
        (SMOKE, "--data_service=grpc://127.0.0.1:{port}"),
        "--data_service=grpc://127.0.0.1:{port} does not answer (Connection refused within",
        "start `python -m effpipe.data_service --port=PORT` on that host",
        leaves=PREPARED,
    ),
    # TEST-NET-1 (RFC 5737): never routed; no answer, or an unreachable network.
    "train-data_service-unroutable": Case(
        "train",
        (SMOKE, "--data_service=grpc://192.0.2.1:5050"),
        "--data_service=grpc://192.0.2.1:5050 does not answer (",
        "start `python -m effpipe.data_service --port=PORT` on that host",
        leaves=PREPARED,
    ),
    # --- effpipe.evaluate: --model that is not a finished run, bad data flags. ---
    "evaluate-model-missing": Case(
        "evaluate",
        ("--model={tmp}/nowhere",),
        "{tmp}/nowhere is not a finished run",
        "point --model at the --workdir of a run that completed",
    ),
    "evaluate-model-unfinished": Case(
        "evaluate",
        ("--model={tmp}/run",),
        "{tmp}/run is not a finished run",
        "point --model at the --workdir of a run that completed",
        setup=_unfinished_run,
    ),
    "evaluate-model-without-export": Case(
        "evaluate",
        ("--model={tmp}/run",),
        "{tmp}/run has no export/ SavedModel",
        "rerun its command with --export",
        setup=_finished_run_without_export,
    ),
    "evaluate-batch_size-0": Case(
        "evaluate",
        ("--model={tmp}/run", "--batch_size=0"),
        "--batch_size=0",
        "at least 1",
        setup=_finished_run_without_export,
    ),
    "evaluate-unknown-flag": Case(
        "evaluate",
        ("--model={tmp}/run", "--epochs=3"),
        "Unknown command line flag 'epochs'",
        "--helpfull` lists the flags",
    ),
    # --- effpipe.predict. ---
    "predict-model-without-export": Case(
        "predict",
        ("--model={tmp}", "x.png"),
        "{tmp} holds no exported model (no saved_model.pb in it or in its export/)",
        "point --model at a finished run's directory",
    ),
    "predict-top_k-0": Case(
        "predict", ("--model={tmp}", "--top_k=0", "x.png"), "--top_k=0", "pass e.g. --top_k=5"
    ),
    "predict-no-image": Case(
        "predict", ("--model={tmp}",), "no image given", "--model=WORKDIR IMAGE..."
    ),
    # --- effpipe.tune_batch. ---
    "tune_batch-memory_budget_gb-0": Case(
        "tune_batch",
        ("--memory_budget_gb=0",),
        "--memory_budget_gb=0",
        "must be a card's memory in GB, above 0",
    ),
    "tune_batch-phase-3": Case("tune_batch", ("--phase=3",), "--phase=3", "one of <1|2|both>"),
    "tune_batch-variant-b9": Case("tune_batch", ("--variant=b9",), "--variant=b9", "one of <b0|"),
    "tune_batch-reserved_mib-above-the-budget": Case(
        "tune_batch",
        ("--memory_budget_gb=1", "--reserved_mib=2048"),
        "--reserved_mib=2048 leaves nothing of --memory_budget_gb=1",
        "lower it",
    ),
    "tune_batch-max_batch-0": Case(
        "tune_batch", ("--max_batch=0",), "--max_batch=0", "must be at least 1"
    ),
    # --- effpipe.data_service. ---
    "data_service-num_workers-0": Case(
        "data_service", ("--num_workers=0",), "--num_workers=0", "at least 1"
    ),
    "data_service-port-70000": Case(
        "data_service", ("--port=70000",), "--port=70000", "must be 1..65535"
    ),
    "data_service-port-in-use": Case(
        "data_service",
        ("--port={port}",),
        "--port={port} is in use",
        "pass another --port",
        setup=_port_in_use,
    ),
    "data_service-work_dir-under-a-file": Case(
        "data_service",
        ("--role=dispatcher", "--port={port}", "--work_dir={tmp}/a_file/journal"),
        "--work_dir={tmp}/a_file/journal cannot be created (Not a directory",
        "pick a directory path you can write to",
        setup=_file_in_the_way,
    ),
    "data_service-work_dir-with-role-all": Case(
        "data_service",
        ("--work_dir={tmp}/journal",),
        "--work_dir={tmp}/journal needs workers that outlive the dispatcher",
        "--role=dispatcher --work_dir=DIR",
    ),
    "data_service-role-worker-without-dispatcher": Case(
        "data_service", ("--role=worker",), "--role=worker needs --dispatcher", "--role=dispatcher"
    ),
    "data_service-dispatcher-refused": Case(
        "data_service",
        ("--role=worker", "--dispatcher=127.0.0.1:{port}"),
        "--dispatcher=127.0.0.1:{port} does not answer (Connection refused",
        "--role=dispatcher --port={port}",
    ),
}


def _free_port() -> int:
    """A port free a moment ago; nothing listens on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_outputs(case: Case, output_path: pathlib.Path, before: bytes | None) -> None:
    """Nothing half-written at the output path: a file that stood there (`before`, its
    bytes) is untouched; else the path is absent or holds exactly `case.leaves`."""
    if before is not None:
        assert output_path.read_bytes() == before
    elif case.leaves is ABSENT:
        assert not output_path.exists()
    else:
        assert set(os.listdir(output_path)) == case.leaves


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_half_written(case, tmp_path):
    holder = case.setup(tmp_path) if case.setup else None
    with holder or contextlib.nullcontext():
        port = holder.getsockname()[1] if holder else _free_port()
        _check_case(case, tmp_path, port)


def _check_case(case: Case, tmp_path: pathlib.Path, port: int) -> None:
    """Runs the case's binary; checks its status, its one line and its outputs."""
    args = [arg.format(tmp=tmp_path, port=port) for arg in case.args]
    output_flag, output_name = OUTPUT_FLAGS.get(case.binary, (None, None))
    output_path = None
    if output_flag:
        given = [arg for arg in args if arg.startswith(f"{output_flag}=")]
        output_path = pathlib.Path(given[0].partition("=")[2] if given else tmp_path / output_name)
        if not given:
            args.append(f"{output_flag}={output_path}")
    before = output_path.read_bytes() if output_path and output_path.is_file() else None
    program = f"effpipe.{case.binary}"
    result = subprocess.run(
        [sys.executable, "-m", program, *args],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SEC,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # TensorFlow's own start-up log lines may precede it; effpipe prints one line.
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr[-3000:]
    assert case.value.format(tmp=tmp_path, port=port) in lines[0]
    assert case.fix.format(port=port) in lines[0]
    if output_path is not None:
        _check_outputs(case, output_path, before)
