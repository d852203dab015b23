"""Each benchmark runs end to end in its seconds-long smoke mode, so it cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from effpipe.errors import UsageError


def _env(repo_root):
    return {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_benchmark(repo_root, module, *args):
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(repo_root),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_augment_throughput_smoke(repo_root):
    lines, report = _run_benchmark(repo_root, "benchmarks.augment_throughput", "--smoke")
    assert any("fused" in line and "keras_chain" not in line for line in lines[:-1])
    assert report["benchmark"] == "augment_throughput"
    (size,) = report["sizes"].values()
    assert size["fused_images_per_sec"] > 0 and size["keras_chain_images_per_sec"] > 0
    assert size["speedup"] == size["fused_images_per_sec"] / size["keras_chain_images_per_sec"]
    # The fused operation is built to compile under XLA; the trainer relies on it.
    assert size["xla_compiles"]["fused"] is True
    assert set(size["xla_compiles"]) == {"fused", "keras_chain", "resize_only"}
    assert {
        "fused/step_xla",
        "fused/step_not_compiled",
        "fused_uncompiled/step_not_compiled",
    } <= set(size["images_per_sec"])


def test_input_throughput_smoke(repo_root):
    lines, report = _run_benchmark(repo_root, "benchmarks.input_throughput", "--smoke")
    assert any(line.startswith("target: effpipe >=") for line in lines)
    assert report["benchmark"] == "input_throughput"
    for key in ("effpipe_images_per_sec", "notebook_images_per_sec", "speedup"):
        assert report[key] > 0, key
    assert report["speedup"] == report["effpipe_images_per_sec"] / report["notebook_images_per_sec"]
    # Every stage of the chain and the notebook pipeline were timed.
    assert len(report["stages_images_per_sec"]) == 5
    assert all(rate > 0 for rate in report["stages_images_per_sec"].values())


def test_step_throughput_smoke(repo_root):
    lines, report = _run_benchmark(repo_root, "benchmarks.step_throughput", "--smoke")
    assert report["benchmark"] == "step_throughput"
    # The trainer's auto steps per call: one on a CPU, several on a GPU.
    assert report["steps_per_execution"] == (1 if report["device"] == "CPU" else 3)
    configurations = report["configurations"]
    assert set(configurations) == {
        "effpipe/noaug/synthetic", "effpipe/noaug/pipeline", "effpipe/aug/synthetic",
        "effpipe/aug/pipeline", "notebook/synthetic", "notebook/numpy", "notebook/generator",
        "effpipe/noaug/feature_cache", "effpipe/noaug/feature_cache/multistep",
    }  # fmt: skip
    on_gpu = report["device"] != "CPU"
    for name, figures in configurations.items():
        assert figures["ms_per_step"] > 0 and figures["images_per_sec"] > 0, name
        assert (figures["peak_memory_mb"] > 0) if on_gpu else figures["peak_memory_mb"] is None
    for name in ("effpipe/noaug/synthetic", "effpipe/noaug/pipeline", "effpipe/aug/pipeline"):
        assert configurations[name]["speedup_vs_notebook"] > 0, name
    # Every configuration fed by an input pipeline has its compute-only counterpart.
    fed = {name for name, figures in configurations.items() if "input_bound_fraction" in figures}
    assert fed == {
        "effpipe/noaug/pipeline", "effpipe/aug/pipeline", "notebook/numpy", "notebook/generator",
    }  # fmt: skip
    assert set(report["targets"]) == {"augment_share_of_step", "noaug_speedup_vs_notebook_as_run"}
    # Phase 1 on cached features against the full model, per epoch of the same steps.
    cache = report["phase1_feature_cache"]
    assert cache["epoch_seconds_with_cache"] > 0 and cache["cache_build_seconds"] > 0
    assert cache["epoch_time_ratio"] == (
        cache["epoch_seconds_with_cache"] / cache["epoch_seconds_without_cache"]
    )
    assert cache["cache_build_images"] == report["steps_per_repeat"] * report["batch_size"]
    # The same cached epoch with the trainer's auto steps per call (3 smoke steps: 3).
    assert cache["steps_per_execution"] == 3 and cache["ms_per_step_with_cache_multistep"] > 0


@pytest.mark.parametrize(
    "module, flag",
    [
        ("benchmarks.step_throughput", "--variant=b9"),
        ("benchmarks.step_throughput", "--repeats=0"),
        ("benchmarks.input_throughput", "--num_batches=0"),
        ("benchmarks.augment_throughput", "--sizes=224,big"),
    ],
)
def test_bad_flag_of_a_benchmark_is_one_line_and_exit_2(repo_root, module, flag):
    result = subprocess.run(
        [sys.executable, "-m", module, flag],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(repo_root),
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"{module}: error:"), result.stderr[-2000:]
    assert flag.split("=")[0] in last_line
    assert "Traceback" not in result.stderr


def test_seed_baseline_still_names_the_notebook_baseline(repo_root):
    # --seed_baseline is --notebook_baseline's earlier name: old command lines still run.
    check = (
        "from absl import flags; from benchmarks import step_throughput as s; "
        "flags.FLAGS(['s', '--noseed_baseline']); assert s._NOTEBOOK_BASELINE.value is False; "
        "flags.FLAGS.unparse_flags(); flags.FLAGS(['s', '--seed_baseline']); "
        "assert s._NOTEBOOK_BASELINE.value is True"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(repo_root),
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_notebook_configurations_answer_to_their_earlier_seed_names():
    from benchmarks import step_configurations

    def group():
        names = ("notebook/numpy", "effpipe/noaug/pipeline")
        return step_configurations.Group(
            lambda: None, [step_configurations.Configuration(n, {}) for n in names]
        )

    (selected,) = step_configurations.select_configurations([group()], ["seed/numpy"])
    assert [c.name for c in selected.configurations] == ["notebook/numpy"]
    with pytest.raises(UsageError, match="nonsense/x not in this run"):
        step_configurations.select_configurations([group()], ["nonsense/x"])


def test_input_throughput_on_a_photo_folder_smoke(repo_root, tmp_path):
    from benchmarks import photo_folder

    folder = photo_folder.make_photo_folder(
        str(tmp_path / "photos"), num_photos=24, num_classes=2, width=80, height=60
    )
    lines, report = _run_benchmark(
        repo_root,
        "benchmarks.input_throughput",
        "--smoke",
        f"--dataset=folder:{folder}",
        "--image_size=32",
        "--batch_size=4",
    )
    assert any(line.startswith("target: first_pass >=") for line in lines)
    assert report["train_images"] == 24 and report["image_size"] == 32
    for key in (
        "first_pass_images_per_sec", "cached_images_per_sec", "keras_images_per_sec",
        "notebook_images_per_sec", "peak_rss_mb",
    ):  # fmt: skip
        assert report[key] > 0, key
    assert (
        report["speedup_cached"] == report["cached_images_per_sec"] / report["keras_images_per_sec"]
    )
