"""The training binary: flagfiles, bad input and the smoke run end to end (the demo:
test_demo.py)."""

import contextlib
import json
import math
import signal

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from binaries import REPO_ROOT, check_png, check_run_outputs, run_train

from effpipe import cli_flags, faults
from effpipe import config as config_lib
from effpipe import train as train_binary  # noqa: F401 (defines --workdir)
from effpipe.errors import UsageError
from effpipe.training import failures, runtime, trainer

FLAGFILES = sorted((REPO_ROOT / "flags").glob("*.flags"))
# The smoke recipe at its source size, 32 px, for the runs that test a path, not
# the resize to another resolution (the smoke run itself keeps 64 px): a quarter of
# the pixels per step.
AT_32_PX = ("--image_size=32",)


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda path: path.name)
def test_every_flagfile_parses_into_a_valid_config(flagfile, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", f"--flagfile=flags/{flagfile.name}", "--workdir=unused"])
        config = cli_flags.config_from_flags()
    assert config.batch_size >= 1


def test_flagfiles_say_what_they_are_for():
    for flagfile in FLAGFILES:
        first_line = flagfile.read_text().splitlines()[0]
        assert first_line.startswith("# "), flagfile.name


def test_seed_flagfile_is_the_notebook_recipe(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", "--flagfile=flags/notebook_b5_rtx3070.flags", "--workdir=x"])
        config = cli_flags.config_from_flags()
    assert (config.model.variant, config.model.resolved_image_size, config.model.head) == (
        "b5",
        456,
        "notebook",
    )
    assert (config.data.validation_fraction, config.data.validation_selection) == (0.3, "last")
    assert (config.phases.phase1_epochs, config.phases.phase1_learning_rate) == (10, 1e-4)
    assert (config.phases.phase2_epochs, config.phases.phase2_learning_rate) == (10, 1e-5)
    assert (config.batch_size, config.runtime.mixed_precision, config.runtime.xla) == (
        32,
        False,
        "off",
    )
    # The notebook defined an augmentation but never applied it.
    assert config.augmentation.augment is False


def test_production_flagfile_applies_the_notebooks_intended_augmentation(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", "--flagfile=flags/b5_rtx3070.flags", "--workdir=x"])
        config = cli_flags.config_from_flags()
    assert config.augmentation.augment and config.augmentation.horizontal_flip
    assert (
        config.augmentation.rotation_degrees,
        config.augmentation.shift_fraction,
        config.augmentation.zoom_fraction,
    ) == (40, 0.2, 0.2)
    # ImageDataGenerator's shear_range=0.2 is in degrees.
    assert (config.augmentation.shear_degrees, config.augmentation.fill_mode) == (0.2, "nearest")


def _error_line(result):
    """The one line effpipe prints for a failure (TensorFlow's start-up log aside)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("effpipe.train:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    result = run_train(
        "--flagfile=flags/smoke.flags",
        "--phase2_learning_rate=1e30",
        "--noexport",
        *AT_32_PX,
        f"--workdir={workdir}",
        timeout_sec=600,
    )
    assert result.returncode == 2
    line = _error_line(result)
    assert "phase 2: the training loss became nan" in line
    assert "lower --phase2_learning_rate (now 1e+30)" in line
    assert "best weights so far" in line and "best.weights.h5" in line
    # Phase 1's checkpoint survives, and holds finite weights.
    with h5py.File(workdir / "checkpoints" / "best.weights.h5") as weights:
        arrays = []
        weights.visititems(
            lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None
        )
    assert arrays and all(np.all(np.isfinite(array)) for array in arrays)
    history = json.loads((workdir / "history.json").read_text())
    assert len(history["phase1"]) == 1 and not math.isfinite(history["phase2"][-1]["loss"])
    assert not (workdir / "metrics.json").exists()
    # The fix the line names: the same command with a lower learning rate resumes
    # from the last good epoch and finishes.
    rerun = run_train(
        "--flagfile=flags/smoke.flags",
        "--phase2_learning_rate=1e-4",
        "--noexport",
        *AT_32_PX,
        f"--workdir={workdir}",
        timeout_sec=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming with changed flags: --phase2_learning_rate=0.0001 (was 1e+30)" in rerun.stderr
    assert "resumed from" in rerun.stderr
    history = json.loads((workdir / "history.json").read_text())
    assert len(history["phase1"]) == 1 and len(history["phase2"]) == 1
    assert math.isfinite(history["phase2"][0]["loss"])


def test_debug_numerics_names_the_op_that_made_the_first_nan(tmp_path):
    result = run_train(
        "--flagfile=flags/smoke.flags",
        "--phase1_learning_rate=1e30",
        "--debug_numerics",
        "--noexport",
        *AT_32_PX,
        f"--workdir={tmp_path / 'run'}",
        timeout_sec=600,
    )
    assert result.returncode == 2
    line = _error_line(result)
    assert "--debug_numerics: the first NaN or infinity came out of effpipe_b0" in line
    assert "No checkpoint was written" in line


# What XLA, cuDNN and cuBLAS say when the device's memory runs out, under error types
# other than ResourceExhaustedError.
OUT_OF_MEMORY_ERRORS = [
    tf.errors.InternalError(None, None, "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."),
    tf.errors.InternalError(None, None, "Failed to get convolution algorithm. This is probably because cuDNN failed to initialize"),
    tf.errors.UnknownError(None, None, "CUDNN_STATUS_ALLOC_FAILED in tensorflow/stream_executor/cuda/cuda_dnn.cc"),
    tf.errors.InternalError(None, None, "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED"),
    tf.errors.InternalError(None, None, "CUDA_ERROR_OUT_OF_MEMORY: out of memory; failed to allocate 2.00G"),
    tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[32,456,456,48]"),
]  # fmt: skip


@pytest.mark.parametrize("error", OUT_OF_MEMORY_ERRORS, ids=lambda e: type(e).__name__)
def test_every_kind_of_out_of_memory_is_one_line_naming_the_batch_and_the_tuner(error):
    config = config_lib.TrainConfig.from_flat(variant="b5", batch_size=48, mixed_precision=True)
    setup = runtime.resolve_runtime(mixed_precision=True, xla="off")
    with pytest.raises(UsageError) as raised:
        with failures.device_errors_as_usage_errors(config, setup, lambda: "Kept: nothing."):
            raise error
    message = str(raised.value)
    assert message.startswith("out of memory on CPU at --batch_size=48 (b5 at 456 px")
    assert "python -m effpipe.tune_batch --variant=b5 --image_size=456 --mixed_precision" in message
    assert message.endswith("Kept: nothing.") and "\n" not in message


def test_other_device_errors_keep_their_type():
    config = config_lib.TrainConfig.from_flat()
    setup = runtime.resolve_runtime(mixed_precision=False, xla="off")
    with pytest.raises(tf.errors.InternalError, match="a kernel failed"):
        with failures.device_errors_as_usage_errors(config, setup, lambda: ""):
            raise tf.errors.InternalError(None, None, "a kernel failed")


def test_running_out_of_device_memory_is_one_line_naming_the_batch_size(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(keras.Model, "fit", out_of_memory)
    config = config_lib.TrainConfig.from_flat(
        dataset="shapes", shapes_train_examples=40, shapes_test_examples=8, variant="b0",
        image_size=32, weights="none", batch_size=8, phase1_epochs=1, phase2_epochs=1,
    )  # fmt: skip
    with pytest.raises(UsageError) as raised:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(raised.value)
    assert "out of memory on CPU at --batch_size=8 (b0 at 32 px, float32)" in message
    assert "lower --batch_size" in message and "No checkpoint was written" in message
    assert (
        "python -m effpipe.tune_batch --variant=b0 --image_size=32 --unfreeze_blocks=3 "
        "--memory_budget_gb=GB" in message
    )


def _tensorboard_tags(folder):
    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    return tags


# SIGKILL at each stage after training (effpipe.faults), then the outputs that stage
# had reached: the evaluation writes nothing; a plot killed mid-write leaves only its
# temporary; an export killed before its rename leaves no export/, only its temporary.
KILLS_AFTER_TRAINING = (
    ("evaluation", [], ["metrics.json", "predictions.png", "export"]),
    ("write:per_class", ["predictions.png"], ["per_class.png", "metrics.json", "export"]),
    ("write:export", ["per_class.png", "augmentations.png"], ["export", "metrics.json"]),
)


def test_smoke_run_killed_at_every_stage_after_training_finishes_with_every_output(tmp_path):
    workdir = tmp_path / "smoke"
    command = ("--flagfile=flags/smoke.flags", "--profile_steps=2,3", f"--workdir={workdir}")
    history = None
    for point, written, missing in KILLS_AFTER_TRAINING:
        killed = run_train(*command, env={faults.KILL_ENV: point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        for name in written:
            assert (workdir / name).exists(), (point, name)
        for name in missing:
            assert not (workdir / name).exists(), (point, name)
        # Training ran once: the reruns resume after its last epoch.
        history = history or (workdir / "history.json").read_text()
        assert (workdir / "history.json").read_text() == history, point
    assert list(workdir.glob(".tmp-export-*/saved_model.pb"))  # The killed export's.
    result = run_train(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase 2, 2 epochs done" in result.stderr
    assert (workdir / "history.json").read_text() == history
    assert not list(workdir.rglob(".tmp-*")), "a killed run's temporaries were left"
    _, metrics = check_run_outputs(workdir, (1, 1))
    assert metrics["variant"] == "b0" and metrics["image_size"] == 64
    assert metrics["precision"] == "float32" and metrics["xla"] is False
    assert metrics["device"] == "CPU" and metrics["num_classes"] == 10
    assert len(metrics["per_class_accuracy"]) == 10 and len(metrics["worst_classes"]) == 10
    assert metrics["worst_classes"][0]["accuracy"] == min(metrics["per_class_accuracy"].values())
    check_png(workdir / "history.png")
    check_png(workdir / "predictions.png", (1000, 600))
    check_png(workdir / "augmentations.png", (800, 400))
    check_png(workdir / "per_class.png", (500, 300))
    assert (workdir / "export" / "saved_model.pb").is_file()
    # TensorBoard: per-phase scalars (Keras' and the meter's), augmented images, and
    # the profiler's trace of steps 2..3.
    for phase in ("phase1", "phase2"):
        logs = workdir / "tensorboard" / phase
        assert {
            "epoch_loss", "epoch_accuracy", "epoch_top5", "epoch_learning_rate",
            "epoch_images_per_sec", "epoch_ms_per_step", "augmented_training_images",
        } <= _tensorboard_tags(logs / "train")  # fmt: skip
        assert {"epoch_loss", "epoch_accuracy", "epoch_top5"} <= _tensorboard_tags(
            logs / "validation"
        )
        assert list((logs / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert "XLA off (--xla=auto on CPU" in result.stderr
    # flags.txt is itself a flagfile that reproduces the run.
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", f"--flagfile={workdir / 'flags.txt'}"])
        reproduced = cli_flags.config_from_flags()
        flags.FLAGS(["effpipe.train", "--flagfile=flags/smoke.flags", "--workdir=x"])
        original = cli_flags.config_from_flags()
        assert flags.FLAGS.workdir == "x"
    assert reproduced == original


def test_the_gpu_path_runs_forced_on_the_cpu_float16_loss_scaling_and_xla(tmp_path):
    """The whole trainer as a GPU runs it: float16 with a LossScaleOptimizer, the
    EfficientNet step and the augmentation compiled by XLA, several steps per call.
    Phase 2 alone: it trains the whole model, the head's phase-1 step and more (each
    phase's XLA compile takes most of a minute on these cores). XLA compiles each of
    its steps once: 10 train steps, 5 per call, and the
    validation (39 images) and test (40) sets, not whole batches of 32, add no shape."""
    workdir, dumps = tmp_path / "float16", tmp_path / "xla"
    result = run_train(
        "--flagfile=flags/smoke.flags", "--mixed_precision", "--mixed_precision_dtype=float16",
        "--xla=on", "--steps_per_execution=5", "--phase1_epochs=0", *AT_32_PX,
        "--shapes_train_examples=390", "--shapes_test_examples=40", f"--workdir={workdir}",
        env={"XLA_FLAGS": f"--xla_dump_to={dumps} --xla_dump_hlo_module_re=.*one_step_on_data.*"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    history, metrics = check_run_outputs(workdir, (0, 1))
    assert metrics["precision"] == "mixed_float16" and metrics["loss_scaling"] is True
    assert metrics["xla"] is True and metrics["augment"] is True
    assert metrics["steps_per_execution"] == {"phase2": 5}
    assert all(record["steps"] == 10 for record in history["phase1"] + history["phase2"])
    # One compilation each of the train, validation and prediction steps.
    compiled = sorted(path.name for path in dumps.glob("*before_optimizations.txt"))
    assert len(compiled) == 3, compiled  # 5 with a second shape of each.
    assert set(metrics["first_step_seconds"]) == {"phase2"}
    assert metrics["first_step_seconds"]["phase2"] > 0 and metrics["startup_seconds"] > 0
    assert "validation on 32 of the 39 held-out images" in result.stderr
    assert math.isfinite(metrics["top1"]) and math.isfinite(metrics["loss"])
    assert "precision mixed_float16 on CPU (--mixed_precision_dtype=float16)" in result.stderr
    # Its export serves anywhere: float32, no function XLA must compile (test_export.py
    # checks the same node by node).
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString(
        (workdir / "export" / "saved_model.pb").read_bytes()
    )
    text = str(saved.meta_graphs[0].graph_def)
    assert "_XlaMustCompile" not in text and "DT_HALF" not in text and "DT_BFLOAT16" not in text
    assert text.count("Conv2D") > 10


def test_the_trainer_turns_off_the_process_wide_switches_it_turned_on():
    """Op determinism left on makes Keras compile any later model of the process
    without XLA. The getter and reset are TensorFlow's private ones, which Keras reads
    too: this fails if they move."""
    from tensorflow.python.framework import config as tf_config

    from effpipe.training import distribution as distribution_lib

    tf_config.disable_op_determinism()  # Whatever an earlier test left.
    config = config_lib.TrainConfig.from_flat(deterministic=True, debug_numerics=True)
    distribution = distribution_lib.resolve(config.distribution.strategy, config.batch_size)
    with contextlib.ExitStack() as stack:
        trainer._resolve_runtime(config, distribution, stack)
        assert tf_config.is_op_determinism_enabled()
    assert not tf_config.is_op_determinism_enabled()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is True
