"""Runtime resolution: precision and XLA per device, a GPU TensorFlow cannot see,
--require_gpu, and the steps per compiled call. GPUs are faked: this machine has none."""

import contextlib
import logging
import os
import pathlib
import stat
import subprocess
import sys
import types

import pytest
import tensorflow as tf

from effpipe.config import TrainConfig
from effpipe.errors import UsageError
from effpipe.training import runtime

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
H200 = {"device_name": "NVIDIA H200", "compute_capability": (9, 0)}
T4 = {"device_name": "Tesla T4", "compute_capability": (7, 5)}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes TensorFlow report one GPU with the details the test passes."""

    def install(details):
        gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
        real_list = tf.config.list_physical_devices
        monkeypatch.setattr(
            tf.config,
            "list_physical_devices",
            lambda kind=None: [gpu] if kind == "GPU" else real_list(kind),
        )
        monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details)

    return install


def _fake_nvidia_smi(folder: pathlib.Path, output: str, status: int = 0) -> pathlib.Path:
    """An `nvidia-smi` script that prints `output`; put `folder` first on PATH."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_a_gpu_gets_float16_with_loss_scaling_and_xla(fake_gpu):
    fake_gpu(H200)
    setup = runtime.resolve_runtime(mixed_precision=True, xla="auto")
    assert (setup.accelerator, setup.device) == ("gpu", "NVIDIA H200")
    assert setup.precision == "mixed_float16" and setup.loss_scaling and setup.xla
    assert "with dynamic loss scaling" in setup.reasons[0]
    assert setup.reasons[1] == "XLA on (--xla=auto on GPU)"
    plain = runtime.resolve_runtime(mixed_precision=False, xla="off")
    assert (plain.precision, plain.loss_scaling, plain.xla) == ("float32", False, False)


def test_bfloat16_on_an_ampere_or_newer_gpu_needs_no_loss_scaling(fake_gpu):
    fake_gpu(H200)
    setup = runtime.resolve_runtime(
        mixed_precision=True, mixed_precision_dtype="bfloat16", xla="auto"
    )
    assert setup.precision == "mixed_bfloat16" and not setup.loss_scaling
    assert "no loss scaling" in setup.reasons[0]


def test_bfloat16_on_an_older_gpu_is_refused_naming_float16(fake_gpu):
    fake_gpu(T4)
    with pytest.raises(UsageError, match="needs an Ampere or newer GPU.*Tesla T4 is 7.5"):
        runtime.resolve_runtime(mixed_precision=True, mixed_precision_dtype="bfloat16", xla="auto")


def test_the_cpu_gets_bfloat16_unless_float16_is_forced():
    auto = runtime.resolve_runtime(mixed_precision=True, xla="auto")
    assert (auto.accelerator, auto.precision, auto.loss_scaling, auto.xla) == (
        "cpu", "mixed_bfloat16", False, False,
    )  # fmt: skip
    forced = runtime.resolve_runtime(
        mixed_precision=True, mixed_precision_dtype="float16", xla="on"
    )
    assert forced.precision == "mixed_float16" and forced.loss_scaling and forced.xla
    assert "--mixed_precision_dtype=float16" in forced.reasons[0]


def test_a_gpu_that_tensorflow_cannot_see_is_a_warning_naming_the_fix(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-0123)")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    devices = runtime.detect_devices()
    assert devices.accelerator == "cpu"
    assert devices.unused_gpus == ("GPU 0: NVIDIA H200 (UUID: GPU-0123)",)
    (warning,) = runtime.resolve_runtime(mixed_precision=False, xla="auto").warnings
    assert "nvidia-smi lists 1 GPU(s) (GPU 0: NVIDIA H200" in warning
    assert "TensorFlow" in warning and "sees none" in warning and "make venv GPU=1" in warning
    with pytest.raises(UsageError, match="--require_gpu: nvidia-smi lists 1 GPU"):
        runtime.require_gpu()


def test_no_driver_means_no_warning(tmp_path, monkeypatch):
    # A driver that answers with an error lists no GPU.
    _fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", status=9)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert runtime.nvidia_smi_gpus() == []
    assert runtime.resolve_runtime(mixed_precision=False, xla="auto").warnings == ()
    with pytest.raises(UsageError, match="no GPU is visible"):
        runtime.require_gpu()


@pytest.mark.parametrize("driver", [False, True], ids=["no driver", "driver without CUDA build"])
def test_require_gpu_stops_the_binary_before_anything_is_written(driver, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if driver:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        _fake_nvidia_smi(bin_dir, "GPU 0: NVIDIA H200 (UUID: GPU-0123)")
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "effpipe.train", "--flagfile=flags/smoke.flags", "--require_gpu",
         f"--workdir={workdir}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("effpipe.train:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    expected = "nvidia-smi lists 1 GPU" if driver else "no GPU is visible"
    assert lines[0].startswith("effpipe.train: error: --require_gpu: ") and expected in lines[0]
    assert not workdir.exists()


@pytest.mark.parametrize(
    "accelerator, head_only, steps_per_epoch, expected",
    [
        ("cpu", False, 100, 1),
        ("gpu", False, 100, 5),
        ("gpu", False, 96, 8),
        ("tpu", False, 7, 7),
        ("gpu", False, 13, 1),
        ("cpu", True, 1093, 1),
        ("cpu", True, 1094, 2),
        ("cpu", True, 96, 32),
        ("gpu", True, 1000, 25),
    ],
)
def test_auto_steps_per_execution_divides_the_epoch(
    accelerator, head_only, steps_per_epoch, expected
):
    steps, reason = runtime.resolve_steps_per_execution(
        TrainConfig.from_flat(), steps_per_epoch, accelerator=accelerator, head_only=head_only
    )
    assert steps == expected and steps_per_epoch % steps == 0
    assert steps <= runtime.AUTO_STEPS_PER_EXECUTION["head" if head_only else accelerator]
    assert reason.startswith(f"{expected} train step(s) per call (auto")


def test_explicit_steps_per_execution_must_divide_the_epoch_and_profiling_takes_one():
    config = TrainConfig.from_flat(steps_per_execution=4)
    assert runtime.resolve_steps_per_execution(config, 12, accelerator="cpu")[0] == 4
    with pytest.raises(UsageError, match="--steps_per_execution=4 must divide the 10 .* use 2"):
        runtime.resolve_steps_per_execution(config, 10, accelerator="cpu")
    profiling = TrainConfig.from_flat(profile_steps="2,3")
    assert runtime.resolve_steps_per_execution(profiling, 64, accelerator="gpu")[0] == 1
    with pytest.raises(UsageError, match="--profile_steps=2,3 could not trace"):
        TrainConfig.from_flat(profile_steps="2,3", steps_per_execution=2)


def test_xla_on_with_several_cpu_replicas_is_refused():
    # tests/test_distribution.py shows the failure: a compiled MirroredStrategy step
    # over two logical CPUs reads another device's variables.
    with pytest.raises(UsageError, match="--xla=on with 2 replicas on CPU devices fails"):
        runtime.resolve_runtime(mixed_precision=False, xla="on", local_replicas=2)
    assert not runtime.resolve_runtime(mixed_precision=False, xla="auto", local_replicas=2).xla


def test_several_gpu_replicas_in_float16_keep_xla_off_unless_asked(fake_gpu):
    fake_gpu(H200)
    float16 = runtime.resolve_runtime(mixed_precision=True, xla="auto", local_replicas=4)
    assert float16.precision == "mixed_float16" and not float16.xla
    assert "keras-team/keras#21366" in float16.reasons[1]
    bfloat16 = runtime.resolve_runtime(
        mixed_precision=True, mixed_precision_dtype="bfloat16", xla="auto", local_replicas=4
    )
    assert bfloat16.xla and not bfloat16.warnings
    forced = runtime.resolve_runtime(mixed_precision=True, xla="on", local_replicas=4)
    assert forced.xla and "keras-team/keras#21366" in forced.warnings[0]
    assert runtime.resolve_runtime(mixed_precision=True, xla="auto", local_replicas=1).xla


def test_a_gpu_run_in_float32_gets_one_hint_naming_mixed_precision(fake_gpu):
    fake_gpu(H200)
    (hint,) = runtime.resolve_runtime(mixed_precision=False, xla="auto").hints
    assert hint == runtime.MIXED_PRECISION_HINT and "--mixed_precision" in hint
    assert "\n" not in hint
    assert runtime.resolve_runtime(mixed_precision=True, xla="auto").hints == ()


def test_a_cpu_run_in_float32_gets_no_hint():
    assert runtime.resolve_runtime(mixed_precision=False, xla="auto").hints == ()


def test_the_run_resolution_takes_the_runtime_slice_and_debug_numerics_turns_xla_off(fake_gpu):
    fake_gpu(H200)
    config = TrainConfig.from_flat(mixed_precision=True, debug_numerics=True)
    setup = runtime.resolve(config.runtime)
    assert setup.precision == "mixed_float16" and not setup.xla
    assert setup.reasons[-1] == "XLA off: --debug_numerics instruments ops XLA cannot run"
    assert runtime.resolve(config.replace(debug_numerics=False).runtime).xla


def test_steps_per_execution_before_the_data_is_known_states_the_rule():
    config = TrainConfig.from_flat()
    assert runtime.resolve_steps_per_execution(config, None, accelerator="cpu") == (
        1, "1 train step per call (auto: 1 for the whole model on CPU)",
    )  # fmt: skip
    steps, reason = runtime.resolve_steps_per_execution(config, None, accelerator="gpu")
    assert steps is None and reason.startswith("up to 8 train steps per call (auto")
    explicit = TrainConfig.from_flat(steps_per_execution=4)
    assert runtime.resolve_steps_per_execution(explicit, None, accelerator="gpu")[0] == 4


def test_the_trainer_logs_the_mixed_precision_hint_on_a_gpu(fake_gpu, caplog):
    from effpipe.training import trainer

    fake_gpu(H200)
    one_replica = types.SimpleNamespace(num_replicas=1, num_workers=1)
    with caplog.at_level(logging.INFO, logger="absl"), contextlib.ExitStack() as stack:
        trainer._resolve_runtime(TrainConfig.from_flat(), one_replica, stack)
    assert [r.getMessage() for r in caplog.records].count(runtime.MIXED_PRECISION_HINT) == 1
