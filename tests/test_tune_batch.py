"""The batch-size tuner: the estimate, the search, its trials and the command."""

import json
import pathlib
import subprocess
import sys
import textwrap

import keras
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from effpipe import cli_flags
from effpipe import config as config_lib
from effpipe import train as train_binary  # noqa: F401 (defines --workdir)
from effpipe.tune import memory, search, tuner

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


def _estimate(batch_size=8, image_size=64, phase=1, mixed=False, unfreeze_blocks=3):
    config = config_lib.TrainConfig.from_flat(
        variant="b0", image_size=image_size, mixed_precision=mixed, unfreeze_blocks=unfreeze_blocks
    )
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        model = tuner.make_phase_model(config, phase)
        return memory.measure_model(model).estimate(batch_size).total
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()


def test_the_estimate_grows_with_batch_and_resolution_and_phase_and_shrinks_with_mixed():
    base = _estimate()
    assert _estimate(batch_size=16) > base
    assert _estimate(image_size=96) > base
    assert _estimate(phase=2) > base
    assert _estimate(phase=2, unfreeze_blocks=16) > _estimate(phase=2)
    # Mixed precision halves activations but adds 16-bit copies of the weights:
    # smaller once activations dominate, as at batch 32.
    for phase in (1, 2):
        float32 = _estimate(batch_size=32, phase=phase)
        assert _estimate(batch_size=32, phase=phase, mixed=True) < float32


def _estimated_max_batch(phase, unfreeze_blocks, mixed=False):
    config = config_lib.TrainConfig.from_flat(
        variant="b5", unfreeze_blocks=unfreeze_blocks, mixed_precision=mixed
    )
    usable = search.usable_budget_bytes(8, reserved_mib=1024)
    best, _, _ = tuner.estimate_phase(config, phase, usable, max_batch=1024)
    return best


def test_the_b5_estimate_at_456_px_lands_where_8_gb_users_report():
    # Reports for whole-network training at native resolution:
    # - B5 at 456 px fitted batch 4 on an 11 GB GTX 1080 Ti
    #   (github.com/wusaifei/garbage_classify/issues/13);
    # - B4 at 380 px topped out at batch 8 on an 11 GB RTX 2080
    #   (github.com/qubvel/efficientnet/issues/64).
    # So on 8 GB, all 39 blocks of B5 in float32 fit a batch of 1 to 8.
    assert 1 <= _estimated_max_batch(phase=2, unfreeze_blocks=39) <= 8
    # The original notebook trained phase 1 (base frozen, float32) at batch 32 on
    # an 8 GB RTX 3070 (its logs: 1094 steps of 32 per epoch).
    assert _estimated_max_batch(phase=1, unfreeze_blocks=4) >= 32


@pytest.mark.parametrize("boundary", [0, 1, 7, 8, 33, 100, 1024])
@pytest.mark.parametrize("start", [1, 5, 64])
def test_the_search_finds_the_boundary_of_a_fake_cost(boundary, start):
    def run_trial(batch_size):
        return search.Trial(batch_size, fits=batch_size <= boundary)

    best, trials = search.search_max_batch(run_trial, start=start, max_batch=1024)
    assert best == boundary
    tried = [trial.batch_size for trial in trials]
    assert len(tried) == len(set(tried)) and max(tried) <= 1024
    assert len(tried) <= 2 * 11 + 2  # Doubling and bisection: logarithmic.


FAKE_TRIAL = textwrap.dedent(
    """
    import json, os, signal, sys
    batch_size = int(sys.argv[1])
    if batch_size <= 12:
        print(json.dumps({"fits": True, "peak_mib": 10.0 * batch_size, "images_per_sec": 5.0}))
    elif batch_size <= 15:
        print("ResourceExhaustedError: OOM when allocating tensor", file=sys.stderr)
        print(json.dumps({"fits": False, "note": "out of memory"}))
    else:
        print("CUDA driver gave up", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("boundary", [3, 57, 200])
def test_a_coarser_resolution_answers_at_most_that_far_below(boundary):
    def run_trial(batch_size):
        return search.Trial(batch_size, fits=batch_size <= boundary)

    best, trials = search.search_max_batch(run_trial, start=16, max_batch=1024, resolution=8)
    assert boundary - 8 < best <= boundary
    assert len(trials) <= len(search.search_max_batch(run_trial, start=16)[1])


def test_the_search_survives_trials_that_run_out_of_memory_or_die(tmp_path):
    script = tmp_path / "trial.py"
    script.write_text(FAKE_TRIAL)

    def run_trial(batch_size):
        argv = [sys.executable, str(script), str(batch_size)]
        return search.run_trial_subprocess(argv, batch_size, timeout_s=60)

    best, trials = search.search_max_batch(run_trial, start=8, max_batch=256)
    assert best == 12
    by_batch = {trial.batch_size: trial for trial in trials}
    assert by_batch[8].fits and by_batch[8].peak_mib == 80.0
    assert not by_batch[14].fits and by_batch[14].note == "out of memory"
    assert not by_batch[16].fits and "died (exit status -9)" in by_batch[16].note


def test_a_trial_failing_for_another_reason_stops_the_search(tmp_path):
    script = tmp_path / "trial.py"
    script.write_text('import json; print(json.dumps({"error": "unknown layer"}))')
    with pytest.raises(RuntimeError, match="batch 4 failed: unknown layer"):
        search.run_trial_subprocess([sys.executable, str(script)], 4, timeout_s=60)


def _run(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_tuner_prints_a_table_json_and_a_flagfile_the_trainer_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    tuned = tmp_path / "tuned.flags"
    result = _run(
        "-m", "effpipe.tune_batch", "--flagfile=flags/smoke.flags", "--memory_budget_gb=0.35",
        "--reserved_mib=0", "--max_batch=64", f"--output={tuned}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["method"] == "estimated" and report["memory_budget_gb"] == 0.35
    assert {"phase1_max_batch", "phase2_max_batch", "trials"} <= set(report)
    assert 1 <= report["phase2_max_batch"] <= report["phase1_max_batch"] <= 64
    assert any(line.startswith("phase  batch  fits") for line in lines)
    # The CPU trial trained the real step at batch 2 and measured its peak RSS.
    assert report["cpu_trial"]["fits"] and report["cpu_trial"]["peak_mib"] > 100
    batch_size = min(report["phase1_max_batch"], report["phase2_max_batch"])
    text = tuned.read_text()
    assert text.startswith("# ") and f"--batch_size={batch_size}\n" in text
    # It sets what was tuned and nothing else: added after a folder recipe, a model or
    # data flag (--source_size=32, say) would change the recipe. Its header names the
    # model the answer holds for.
    flag_lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert flag_lines == [f"--batch_size={batch_size}"]
    assert "# It holds for b0 at 64 px, float32, XLA auto, the pooled head" in text

    # The trainer's own flags take it after the recipe (training at another batch
    # size is every other trainer test's business).
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", "--flagfile=flags/smoke.flags", f"--flagfile={tuned}",
                     "--workdir=unused"])  # fmt: skip
        assert cli_flags.config_from_flags().batch_size == batch_size


def _tune(*args):
    result = _run(
        "-m", "effpipe.tune_batch", "--flagfile=flags/smoke.flags", "--method=measured",
        "--phase=1", "--max_batch=2", "--reserved_mib=0", "--output=", *args,
    )  # fmt: skip
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_measured_search_runs_real_trials_on_the_cpu_against_host_memory():
    # No GPU here: each trial trains the real step in its own process, uncapped, and
    # fits when that process's peak RSS stays within the budget. A budget below what
    # TensorFlow itself takes fits no batch; a large one fits the search's ceiling.
    result, report = _tune("--memory_budget_gb=0.25")
    assert result.returncode == 1, result.stderr[-3000:]
    assert (report["method"], report["device"], report["phase1_max_batch"]) == (
        "measured", "CPU", 0,
    )  # fmt: skip
    # The search starts from the estimate's answer and halves down to batch 1.
    assert [trial["batch_size"] for trial in report["trials"]][-1] == 1
    for trial in report["trials"]:
        assert trial["method"] == "measured" and not trial["fits"]
        assert trial["peak_mib"] > 256 and "over the 256 MiB budget" in trial["note"]
        assert trial["images_per_sec"] > 0
    result, report = _tune("--memory_budget_gb=64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["phase1_max_batch"] == 2 and len(report["trials"]) == 1
    (trial,) = report["trials"]
    assert trial["fits"] and 256 < trial["peak_mib"] < 64 * 1024 and trial["estimated_mib"] > 0


def test_a_trial_that_runs_out_of_memory_in_any_words_does_not_fit(monkeypatch):
    from effpipe.model import factory

    def fails(*args, **kwargs):
        raise tf.errors.InternalError(
            None, None, "Failed to get convolution algorithm. This is probably because cuDNN "
            "failed to initialize"
        )  # fmt: skip

    monkeypatch.setattr(factory, "compile_model", fails)
    config = config_lib.TrainConfig.from_flat().replace(variant="b0", image_size=32)
    answer = tuner.run_trial(config, 1, 4, GIB, steps=1)
    assert answer == {"fits": False, "note": "out of memory (InternalError)"}
