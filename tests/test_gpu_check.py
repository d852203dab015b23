"""benchmarks.gpu_check: its runner keeps every outcome, and the whole check runs at a
tiny scale (--smoke) on a machine without a GPU."""

import json
import math
import os
import subprocess
import sys

from benchmarks import gpu_check, gpu_check_parts, gpu_check_report, part_runner

SMOKE_PARTS = set(gpu_check.SMOKE_PARTS)


def _run_check(repo_root, *args, env=None, timeout=1500):
    # The timeout is a hang guard only.
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(repo_root), **(env or {})},
    )


def _python(code: str) -> list[str]:
    return ["-c", code]


def _read_x(result):
    return {"x": gpu_check_parts.finite("x", gpu_check_parts.require_json(result)["x"])}


def test_run_command_keeps_a_failure_and_its_last_stderr_lines(tmp_path):
    outcome = part_runner.run_command(
        [sys.executable, "-c", "import sys; print('last words', file=sys.stderr); sys.exit(3)"],
        timeout_s=120,
        env=dict(os.environ),
        log_prefix=str(tmp_path / "part"),
    )
    assert outcome["status"] == "failed"
    assert outcome["returncode"] == 3
    assert outcome["stderr_tail"] == ["last words"]
    assert outcome["final_json"] is None


def test_run_command_kills_a_part_past_its_timeout(tmp_path):
    outcome = part_runner.run_command(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(600)"],
        timeout_s=2,
        env=dict(os.environ),
        log_prefix=str(tmp_path / "part"),
    )
    assert outcome["status"] == "timed_out"
    assert outcome["returncode"] < 0  # Killed by a signal.
    assert (tmp_path / "part.stdout").read_text() == "started\n"


def test_runner_records_each_outcome_and_goes_on(tmp_path):
    output = tmp_path / "check.json"
    runner = part_runner.Runner(str(output), deadline_s=600, report={})
    parts = [
        part_runner.Part("fails", _python("import sys; sys.exit('broken')"), 120, 0, _read_x),
        part_runner.Part("hangs", _python("import time; time.sleep(600)"), 2, 0, _read_x),
        part_runner.Part("too_long", _python("print(1)"), 120, 10**6, _read_x),
        part_runner.Part("not_finite", _python("print('{\"x\": NaN}')"), 120, 0, _read_x),
        part_runner.Part("no_json", _python("print('done')"), 120, 0, _read_x),
        part_runner.Part(
            "works", _python("print('table'); print('{\"x\": 1.5}')"), 120, 0, _read_x
        ),
    ]
    for part in parts:
        runner.run(part)
        # The file is rewritten after every part: what ran so far is on disk.
        assert part.name in json.loads(output.read_text())["parts"]
    records = json.loads(output.read_text())["parts"]
    assert list(records) == [part.name for part in parts]
    assert {name: record["status"] for name, record in records.items()} == {
        "fails": "failed",
        "hangs": "timed_out",
        "too_long": "skipped",
        "not_finite": "failed",
        "no_json": "failed",
        "works": "ok",
    }
    assert records["fails"]["stderr_tail"] == ["broken"]
    assert "deadline" in records["too_long"]["reason"]
    assert "not a finite number" in records["not_finite"]["error"]
    assert "no JSON object" in records["no_json"]["error"]
    assert records["works"]["figures"] == {"x": 1.5}
    assert records["works"]["result"] == {"x": 1.5}


def test_runner_injects_a_failure_into_the_named_part(tmp_path, monkeypatch):
    monkeypatch.setenv(part_runner.FAIL_ENV, "chosen")
    runner = part_runner.Runner(str(tmp_path / "check.json"), deadline_s=600, report={})
    ok = _python("print('{\"x\": 2}')")
    assert runner.run(part_runner.Part("chosen", ok, 120, 0, _read_x))["status"] == "failed"
    assert runner.run(part_runner.Part("other", ok, 120, 0, _read_x))["status"] == "ok"


def test_without_a_gpu_it_prints_its_plan_and_budget_and_exits_0(repo_root, tmp_path):
    output = tmp_path / "gpu_check.json"
    # CUDA_VISIBLE_DEVICES="" hides any GPU from TensorFlow, so this holds on any machine.
    result = _run_check(
        repo_root, f"--output={output}", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check: no GPU visible (")
    assert lines[0].endswith("TensorFlow sees none): nothing measured")
    # The plan: every part in its order, with its time box; then the budget.
    rows = [line.split()[:3] for line in lines[3:-1]]
    plan = gpu_check_parts.make_plan(smoke=False)
    assert [row[0] for row in rows] == gpu_check_parts.PART_NAMES == [p.name for p in plan]
    assert [float(row[1].replace(",", "")) for row in rows] == [p.timeout_s for p in plan]
    assert lines[-1].startswith("budget: 450 s in all")
    assert not output.exists()


def test_a_gpu_this_tensorflow_cannot_use_is_an_error_not_a_quiet_cpu_run(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    listed = [{"name": "NVIDIA H200", "memory_total": "143771 MiB", "driver_version": "570"}]
    line, status = gpu_check.no_gpu_line(listed, "")
    assert status == 1
    assert "NVIDIA H200" in line and "GPU build" in line
    # Hidden on purpose, it is a machine without a GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    line, status = gpu_check.no_gpu_line(listed, "")
    assert status == 0 and line.endswith("TensorFlow sees none): nothing measured")
    assert gpu_check.no_gpu_line([], "nvidia-smi not found") == (
        "gpu_check: no GPU visible (nvidia-smi not found; TensorFlow sees none): nothing measured",
        0,
    )


def test_bad_part_name_is_one_line_and_exit_2(repo_root):
    result = _run_check(repo_root, "--smoke", "--parts=augment,bogus", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("benchmarks.gpu_check: error: --parts=augment,bogus")
    assert "bogus" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_part_is_recorded_and_the_others_still_run(repo_root, tmp_path):
    output = tmp_path / "gpu_check.json"
    result = _run_check(
        repo_root, "--smoke", f"--output={output}", "--parts=tuner_estimate,step_p1_8gb,augment",
        env={part_runner.FAIL_ENV: "tuner_estimate"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    parts = report["parts"]
    assert parts["tuner_estimate"]["status"] == "failed"
    assert "injected failure" in parts["tuner_estimate"]["stderr_tail"][-1]
    # The 8 GB step needs the estimate's answer; the others do not.
    assert parts["step_p1_8gb"] == {
        "status": "skipped",
        "wall_s": 0.0,
        "reason": "needs tuner_estimate (failed)",
    }
    assert parts["augment"]["status"] == "ok"
    assert parts["headline"]["reason"] == "not in --parts"
    assert report["finished"] is True


def test_the_summary_sets_the_peer_parts_beside_keras_recipe_against_the_target():
    def step_record(phase, milliseconds):
        configurations = {name: {"ms_per_step": ms} for name, ms in milliseconds.items()}
        result = {
            "benchmark": "step_throughput", "phase": phase, "precision": "mixed_float16",
            "xla": True, "batch_size": 32, "configurations": configurations, "targets": {},
        }  # fmt: skip
        figures = {}
        for name, ms in milliseconds.items():
            figures[f"{name}/ms_per_step"] = ms
            figures[f"{name}/images_per_sec"] = 32_000.0 / ms
        return {"status": "ok", "result": result, "figures": figures}

    parts = {
        "step_p1_mixed_xla_on": step_record(1, {"effpipe/noaug/synthetic": 20.0}),
        # A peer part times no compute-only step: it has no row among the steps.
        "peer_p1_mixed_xla_on": step_record(
            1, {"effpipe/aug/pipeline": 25.0, "keras_recipe": 50.0}
        ),
        "peer_p2_mixed_xla_on": step_record(
            2, {"effpipe/aug/pipeline": 30.0, "keras_recipe": 36.0}
        ),
    }
    summary = gpu_check_report.summarize(parts)
    assert [step["part"] for step in summary["steps"]] == ["step_p1_mixed_xla_on"]
    assert [peer["speedup_vs_keras_recipe"] for peer in summary["peers"]] == [2.0, 1.2]
    assert summary["peers"][0]["keras_recipe_images_per_sec"] == 640.0
    assert summary["target_phase1_speedup_vs_keras_recipe"]["met"] is True
    assert summary["target_phase2_speedup_vs_keras_recipe"] == {
        "value": 1.2, "limit": 1.5, "met": False,
    }  # fmt: skip
    assert {"peer_p1_mixed_xla_on", "peer_p2_mixed_xla_on"} <= set(gpu_check_parts.PART_NAMES)


def test_smoke_runs_every_part_and_records_finite_figures(repo_root, tmp_path):
    output = tmp_path / "gpu_check.json"
    # The default deadline is the GPU's budget; on shared CPU cores every part must run.
    result = _run_check(repo_root, "--smoke", f"--output={output}", "--deadline_s=1200")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    parts = report["parts"]
    assert set(parts) == SMOKE_PARTS
    failed = {name: record for name, record in parts.items() if record["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1)[-3000:]
    for name, record in parts.items():
        assert record["figures"], name
        for key, value in record["figures"].items():
            assert isinstance(value, bool) or math.isfinite(value), (name, key, value)
    assert report["finished"] is True and report["smoke"] is True

    headline = parts["headline"]["figures"]
    assert headline["first_step_seconds/phase1"] > 0 and headline["first_step_seconds/phase2"] > 0
    assert headline["export_mb"] > 0 and headline["profile/trace_ms_per_step"] > 0
    assert parts["headline"]["result"]["profile"]["top_ops"]

    estimate = parts["tuner_estimate"]["figures"]
    at_8gb = parts["step_p1_8gb"]["result"]
    assert at_8gb["batch_size"] == estimate["phase1_max_batch"]
    assert set(at_8gb["configurations"]) == set(gpu_check_parts.NOAUG)
    # Capped, as the tuner's trials are, at the card's usable MiB (a GPU's allocator).
    cap = f"--memory_cap_mib={int(estimate['usable_mib'])}"
    assert cap in parts["step_p1_8gb"]["command"].split()

    whole = parts["step_p1_mixed_xla_on"]
    for name in gpu_check_parts.NOAUG + gpu_check_parts.REPLICA:
        assert whole["figures"][f"{name}/ms_per_step"] > 0, name
    _check_step_benchmark(whole["result"])
    _check_augment_benchmark(
        parts["augment"]["result"], (tmp_path / "gpu_check_logs" / "augment.stdout").read_text()
    )
    assert any(key.endswith("/speedup") for key in parts["augment"]["figures"])

    steps = {step["part"]: step for step in report["summary"]["steps"]}
    assert set(steps) == {"step_p1_mixed_xla_on", "step_p1_8gb"}
    for step in steps.values():  # Both against the phase-1 replica, in images/s.
        replica = report["summary"]["replica_images_per_sec"]["phase1/notebook/synthetic"]
        assert step["speedup_vs_replica"] == step["images_per_sec"] / replica
    # The part that times every configuration has effpipe beside the keras_recipe peer.
    (peer,) = report["summary"]["peers"]
    assert peer["part"] == "step_p1_mixed_xla_on"
    assert peer["speedup_vs_keras_recipe"] == (
        whole["figures"]["keras_recipe/ms_per_step"]
        / whole["figures"]["effpipe/aug/pipeline/ms_per_step"]
    )
    assert result.stdout.strip().splitlines()[-1].startswith(f"gpu_check: wrote {output}")


def _check_step_benchmark(report):
    """benchmarks.step_throughput --smoke at its defaults (the smoke's first step part
    times every configuration)."""
    assert report["benchmark"] == "step_throughput"
    # The trainer's auto steps per call: one on a CPU, several on a GPU.
    assert report["steps_per_execution"] == (1 if report["device"] == "CPU" else 3)
    configurations = report["configurations"]
    assert set(configurations) == {
        "effpipe/noaug/synthetic", "effpipe/noaug/pipeline", "effpipe/aug/synthetic",
        "effpipe/aug/pipeline", "notebook/synthetic", "notebook/numpy", "notebook/generator",
        "effpipe/noaug/feature_cache", "effpipe/noaug/feature_cache/multistep", "keras_recipe",
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
    assert set(report["targets"]) == {
        "augment_share_of_step", "noaug_speedup_vs_notebook_as_run", "aug_speedup_vs_keras_recipe",
    }  # fmt: skip
    assert configurations["effpipe/aug/pipeline"]["speedup_vs_keras_recipe"] == (
        configurations["keras_recipe"]["ms_per_step"]
        / configurations["effpipe/aug/pipeline"]["ms_per_step"]
    )
    # Phase 1 on cached features against the full model, per epoch of the same steps.
    cache = report["phase1_feature_cache"]
    assert cache["epoch_seconds_with_cache"] > 0 and cache["cache_build_seconds"] > 0
    assert cache["epoch_time_ratio"] == (
        cache["epoch_seconds_with_cache"] / cache["epoch_seconds_without_cache"]
    )
    assert cache["cache_build_images"] == report["steps_per_repeat"] * report["batch_size"]
    # The same cached epoch with the trainer's auto steps per call (3 smoke steps: 3).
    assert cache["steps_per_execution"] == 3 and cache["ms_per_step_with_cache_multistep"] > 0


def _check_augment_benchmark(report, stdout):
    """benchmarks.augment_throughput --smoke: its table and its JSON line."""
    assert any("fused" in line and "keras_chain" not in line for line in stdout.splitlines())
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
