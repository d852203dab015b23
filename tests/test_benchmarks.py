"""Each benchmark runs end to end in its seconds-long smoke mode, so it cannot rot (the
step and augmentation benchmarks inside the GPU check's smoke run: test_gpu_check.py)."""

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
        "decode_ceiling_images_per_sec", "notebook_images_per_sec", "peak_rss_mb",
    ):  # fmt: skip
        assert report[key] > 0, key
    assert (
        report["speedup_cached"] == report["cached_images_per_sec"] / report["keras_images_per_sec"]
    )
