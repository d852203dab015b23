"""benchmarks.profile_summary on a real trace of a few training steps on this CPU (through
Keras' TensorBoard callback, as the trainer's --profile_steps), on a hand-built GPU trace
(each kernel counted once), and the private protobuf path it depends on."""

import importlib
import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import profile_summary

PROFILE_BATCH = (3, 5)
STEPS = PROFILE_BATCH[1] - PROFILE_BATCH[0] + 1


def _trace(log_dir: str, jit_compile: bool = False) -> str:
    """Traces 3 of 8 training steps of a small conv net into `log_dir`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(0)
    images = rng.random((8 * 16, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, 8 * 16)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).prefetch(2)
    tensorboard = keras.callbacks.TensorBoard(log_dir=log_dir, profile_batch=PROFILE_BATCH)
    model.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[tensorboard])
    return log_dir


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return _trace(str(tmp_path_factory.mktemp("tensorboard")))


def test_a_step_xla_compiled_for_the_cpu_shows_its_hlo_ops(tmp_path, repo_root):
    # In a fresh process: an earlier test's in-process run with --deterministic leaves
    # TensorFlow's op determinism on, and Keras then compiles without XLA.
    trace = f"import test_profile_summary as t; t._trace({str(tmp_path)!r}, jit_compile=True)"
    tests = os.pathsep.join([str(repo_root / "tests"), str(repo_root)])
    result = subprocess.run(
        [sys.executable, "-c", trace], cwd=repo_root, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": tests, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = profile_summary.summarize(str(tmp_path))
    types = {op["type"] for op in summary["top_types"]}
    assert "convolution" in types, summary["top_types"]
    assert summary["device_busy_ms_per_step"] > 0


def test_summary_of_a_cpu_training_trace(trace_dir):
    summary = profile_summary.summarize(trace_dir)  # Steps: its traced batches.

    # Keras 3 writes the trace under LOG_DIR/train/plugins/profile/<time>/.
    assert summary["trace"].startswith(os.path.join(trace_dir, "train", "plugins", "profile"))
    assert summary["device"] == "/host:CPU"
    assert summary["steps"] == STEPS and summary["profiled_batches"] == STEPS
    top_ops = summary["top_ops"]
    assert 0 < len(top_ops) <= 10
    assert all(op["total_ms"] > 0 and op["count"] >= 1 for op in top_ops)
    assert all(0 < op["share"] <= 1 for op in top_ops)
    assert sum(op["share"] for op in top_ops) <= 1 + 1e-3
    # On the CPU the convolutions (oneDNN's _MklNative* kernels) take most of the step.
    assert "Conv2D" in top_ops[0]["type"], top_ops[0]
    assert math.isfinite(summary["input_wait_ms_per_step"])
    assert summary["input_wait_ms_per_step"] >= 0
    assert summary["trace_ms"] > 0
    assert summary["trace_ms_per_step"] == pytest.approx(summary["trace_ms"] / STEPS)
    busy = summary["device_busy_ms_per_step"]
    assert 0 < busy <= summary["op_ms_per_step"] + 1e-9
    assert busy <= summary["trace_ms_per_step"] + 1e-9
    json.dumps(summary)


def test_cli_prints_a_table_then_one_json_line(trace_dir, repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_summary", f"--trace_dir={trace_dir}", "--top=3"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.split()[:2] == ["op", "total"] for line in lines)
    report = json.loads(lines[-1])
    assert report["benchmark"] == "profile_summary" and len(report["top_ops"]) == 3


def test_a_folder_without_a_trace_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        profile_summary.summarize(str(tmp_path), steps=STEPS)


def test_xplane_protobuf_path_still_exists():
    try:
        xplane_pb2 = importlib.import_module(profile_summary.XPLANE_PB2_MODULE)
    except ImportError as error:
        pytest.fail(
            f"TensorFlow {tf.__version__} moved {profile_summary.XPLANE_PB2_MODULE} ({error}): "
            "benchmarks/profile_summary.py reads traces with this private protobuf; setup.cfg "
            "pins tensorflow<2.22 for this. Point XPLANE_PB2_MODULE at its new place."
        )
    fields = {f.name for f in xplane_pb2.XEvent.DESCRIPTOR.fields}
    assert {"metadata_id", "offset_ps", "duration_ps"} <= fields
    assert "timestamp_ns" in {f.name for f in xplane_pb2.XLine.DESCRIPTOR.fields}


def test_gpu_kernels_on_stream_lines_are_counted_once(tmp_path):
    long_kernel = "void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_" + "x" * 200 + ">(Params)"
    kernels = {
        "Stream #7(Kernel)": [("loop_add_fusion", 0, 4), ("loop_add_fusion", 10, 4)],
        "Stream #8(Kernel,MemcpyH2D)": [(long_kernel, 2, 6)],
    }
    planes = {
        "/host:CPU": {
            "python": [("Profiled batch", 0, 9), ("Profiled batch", 9, 9)],
            "tf_data_iterator_get_next": [("IteratorGetNextOp::DoCompute", 0, 1)] * 2,
        },
        # xprof derives these lines from the streams: the same kernels again.
        "/device:GPU:0": {**kernels, "XLA Ops": kernels["Stream #7(Kernel)"]},
        "/device:GPU:1": {"Stream #9(Kernel)": [("other_gpu_fusion", 0, 50)]},
    }
    folder = tmp_path / "train" / "plugins" / "profile" / "t"
    folder.mkdir(parents=True)
    (folder / "host.xplane.pb").write_bytes(_xspace(planes).SerializeToString())

    summary = profile_summary.summarize(str(tmp_path), steps=2)

    assert summary["device"] == "/device:GPU:0"
    names = [(op["name"], op["count"], op["total_ms"], op["share"]) for op in summary["top_ops"]]
    assert names == [
        ("loop_add_fusion", 2, 0.008, round(8 / 14, 4)),
        (long_kernel[:77] + "...", 1, 0.006, round(6 / 14, 4)),
    ]
    assert summary["op_ms_per_step"] == pytest.approx(0.014 / 2)
    # The streams overlap over 2..4 us: busy 12 of the 14 us of kernels.
    assert summary["device_busy_ms_per_step"] == pytest.approx(0.012 / 2)
    # Both get-next calls run over 0..1 us.
    assert summary["input_wait_ms_per_step"] == pytest.approx(0.001 / 2)
    assert summary["trace_ms"] == pytest.approx(0.018)
    assert summary["profiled_batches"] == 2


def _xspace(planes: dict):
    """An XSpace of {plane name: {line name: [(event name, start us, duration us)]}}."""
    xplane_pb2 = importlib.import_module(profile_summary.XPLANE_PB2_MODULE)
    space = xplane_pb2.XSpace()
    for plane_name, lines in planes.items():
        plane = space.planes.add(name=plane_name)
        metadata_ids = {}
        for line_id, (line_name, events) in enumerate(lines.items()):
            line = plane.lines.add(id=line_id, name=line_name, timestamp_ns=1000)
            for name, start_us, duration_us in events:
                metadata_id = metadata_ids.setdefault(name, len(metadata_ids) + 1)
                plane.event_metadata[metadata_id].id = metadata_id
                plane.event_metadata[metadata_id].name = name
                line.events.add(
                    metadata_id=metadata_id,
                    offset_ps=start_us * 1_000_000,
                    duration_ps=duration_us * 1_000_000,
                )
    return space
