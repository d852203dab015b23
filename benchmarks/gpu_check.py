"""One command for the GPU figures: the headline run and every step the README lacks, in 8 min.

    python -m benchmarks.gpu_check                    # on one GPU: runs/gpu_check.json
    python -m benchmarks.gpu_check --smoke            # any machine: every kind of part, tiny
    python -m benchmarks.gpu_check --parts=headline,step_p1_8gb
    python -m benchmarks.gpu_check --results_dir=results  # also a record per part

Prints the GPU's name (nvidia-smi, and TensorFlow's view, asked in a subprocess) and
the plan (benchmarks.gpu_check_parts: each part, its time box, and what it measures),
then runs each part as its own subprocess with its own timeout, cut to what is left of
a total deadline (--deadline_s); a part that no longer fits is skipped and recorded as
skipped. After every part it rewrites --output, a JSON file with, per part: status (ok,
failed with its last stderr lines, timed_out, skipped with the reason, interrupted),
wall seconds, the command, the part's figures (finite numbers) and its final JSON line
as printed; each part's full stdout and stderr are kept in <output>_logs/. It ends with
summary tables: each step setting against the notebook replica of its phase, and
effpipe against the keras_recipe peer, on the same GPU. SIGTERM or Ctrl-C kills the
running part and still writes the file. Without a GPU (and without --smoke) it prints
the plan and its time budget and exits 0; a GPU that nvidia-smi lists but this
TensorFlow cannot use (a CPU-only build) is one line on stderr and exit status 1, not
a run on the CPU. --smoke runs the kinds of part SMOKE_PARTS names at a tiny scale on
the CPU (a few minutes on 2 shared cores).
"""

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import flags

from benchmarks import gpu_check_parts, harness, part_runner, records, step_report
from benchmarks.gpu_check_parts import PART_NAMES, PEER, REPLICA
from benchmarks.part_runner import Runner

PROGRAM = "benchmarks.gpu_check"

_OUTPUT = flags.DEFINE_string("output", "runs/gpu_check.json", "The JSON file of all figures.")
_DEADLINE_S = flags.DEFINE_float(
    "deadline_s", 450.0, "Total seconds; no part runs past it (the script then stops)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Every kind of part at a tiny scale, on any machine.")
_PARTS = flags.DEFINE_list("parts", [], "Run only these parts (names as in the docstring).")
flags.adopt_module_key_flags(records)

# effpipe's phase-1 step, fed, against the replica as it ran (step_report imports no
# TensorFlow, so this process still never loads it).
PHASE1_TARGET_SPEEDUP = step_report.GPU_PHASE1_TARGET_SPEEDUP
# effpipe fed and augmenting against the keras_recipe peer, each phase.
PEER_TARGET_SPEEDUP = step_report.GPU_TARGET_SPEEDUP_VS_KERAS_RECIPE
# The parts --smoke runs: one of each kind (the first step part times every
# configuration of the step benchmark).
SMOKE_PARTS = ["headline", "step_p1_mixed_xla_on", "tuner_estimate", "step_p1_8gb", "augment"]


# --- The GPU. ---


def nvidia_smi_gpus() -> tuple[list[dict], str]:
    """What the NVIDIA driver lists (no TensorFlow): ([{name, memory_total,
    driver_version}], a note saying why the list is empty)."""
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        listed = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        return [], "nvidia-smi not found"
    except subprocess.TimeoutExpired:
        return [], "nvidia-smi gave no answer in 30 s"
    if listed.returncode:
        return [], f"nvidia-smi exit status {listed.returncode}"
    gpus = []
    for line in listed.stdout.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) >= 3:
            gpus.append(dict(zip(("name", "memory_total", "driver_version"), fields)))
    return gpus, "" if gpus else "nvidia-smi lists none"


def tensorflow_gpus() -> list[dict]:
    """The GPUs this environment's TensorFlow can use (name, compute capability),
    asked in a subprocess: this process never imports TensorFlow. Listing devices
    does not start CUDA, so it takes no GPU memory."""
    script = (
        "import json, tensorflow as tf; print(json.dumps([tf.config.experimental."
        "get_device_details(g) for g in tf.config.list_physical_devices('GPU')]))"
    )
    try:
        answer = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
        details = json.loads(answer.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return []
    return [
        {"name": d.get("device_name", "GPU"), "compute_capability": d.get("compute_capability")}
        for d in details
    ]


def no_gpu_line(smi_gpus: list[dict], smi_note: str) -> tuple[str, int]:
    """The one line said when TensorFlow sees no GPU, and the exit status: 0 on a
    machine without one, 1 where the driver lists one this TensorFlow cannot use
    (a CPU-only build: every part would crawl on the CPU)."""
    if smi_gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
        return (
            f"gpu_check: nvidia-smi lists {len(smi_gpus)} GPU(s) ({smi_gpus[0]['name']}) but "
            "TensorFlow sees none: install TensorFlow's GPU build (make venv GPU=1): nothing "
            "measured",
            1,
        )
    listed = smi_note
    if smi_gpus:
        hidden = os.environ["CUDA_VISIBLE_DEVICES"]
        listed = f"nvidia-smi lists {len(smi_gpus)}; CUDA_VISIBLE_DEVICES={hidden!r}"
    return f"gpu_check: no GPU visible ({listed}; TensorFlow sees none): nothing measured", 0


# --- The run. ---


def main(argv):
    from effpipe import cli_flags
    from effpipe.errors import UsageError

    cli_flags.refuse_arguments(PROGRAM, argv)
    unknown = [name for name in _PARTS.value if name not in PART_NAMES]
    if unknown:
        raise UsageError(
            f"--parts={','.join(_PARTS.value)}: no part {', '.join(unknown)}; choose from "
            f"{','.join(PART_NAMES)}"
        )
    if _DEADLINE_S.value <= 0:
        raise UsageError(f"--deadline_s={_DEADLINE_S.value:g} must be above 0 (e.g. 450)")
    smoke = _SMOKE.value
    started = time.monotonic()
    plan = gpu_check_parts.make_plan(smoke)
    if smoke:
        plan = [part for part in plan if part.name in SMOKE_PARTS]
    smi_gpus, smi_note = nvidia_smi_gpus()
    # --smoke runs wherever it is, at a scale where the device does not matter.
    tf_gpus = [] if smoke else tensorflow_gpus()
    if not tf_gpus and not smoke:
        line, status = no_gpu_line(smi_gpus, smi_note)
        print(line, file=sys.stderr if status else sys.stdout)
        if not status:
            print_plan(plan, _DEADLINE_S.value)
        sys.exit(status)
    output = os.path.abspath(_OUTPUT.value)
    names = [gpu["name"] for gpu in tf_gpus or smi_gpus] or ["none"]
    print(
        f"gpu_check{' --smoke (tiny scale, plumbing only)' if smoke else ''}: GPU "
        f"{', '.join(names)}; writing {output}",
        flush=True,
    )
    print_plan(plan, _DEADLINE_S.value)
    report = {
        "check": PROGRAM,
        "smoke": smoke,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", PROGRAM, *sys.argv[1:]]),
        "deadline_s": _DEADLINE_S.value,
        "nvidia_smi": smi_gpus or smi_note,
        "tensorflow_gpus": tf_gpus if not smoke else "not asked: --smoke",
        "finished": False,
    }
    signal.signal(signal.SIGTERM, part_runner.stop)
    signal.signal(signal.SIGINT, part_runner.stop)
    left_s = _DEADLINE_S.value - (time.monotonic() - started)
    runner = Runner(output, left_s, report, selected=set(_PARTS.value) or None)
    for part in plan:
        if part.name.endswith("_8gb"):
            estimate = report["parts"].get("tuner_estimate", {})
            part, why_not = gpu_check_parts.at_batch(part.name, estimate, smoke), part.name
            if isinstance(part, str):
                runner.skip(why_not, part)
                continue
        runner.run(part)

    report["summary"] = summarize(report["parts"])
    report["finished"] = not part_runner.STOPPED_BY
    report["wall_s"] = round(time.monotonic() - started, 1)
    runner.write()
    print_summary(report)
    print(f"gpu_check: wrote {output} in {report['wall_s']:.0f} s")
    records.record_gpu_check(report)
    if part_runner.STOPPED_BY:
        sys.exit(128 + part_runner.STOPPED_BY[0])


def print_plan(plan: list, deadline_s: float) -> None:
    """The parts in the order they run, each with its time box, and the budget."""
    harness.print_table(
        ["part", "time box s", "starts if s left", "measures"],
        [[part.name, part.timeout_s, part.needs_s, part.what] for part in plan],
    )
    print(
        f"budget: {deadline_s:.0f} s in all ({sum(p.timeout_s for p in plan):.0f} s if every "
        "part used its box): a part starts only while the deadline leaves it its least "
        "seconds; the rest are skipped and recorded so",
        flush=True,
    )


def summarize(parts: dict) -> dict:
    """The step settings side by side, each against the replica of its phase (in
    images/s: the 8 GB parts run another batch); and every part that timed effpipe fed
    and augmenting beside the keras_recipe peer."""
    replica = {}
    for record in parts.values():
        result = record.get("result") or {}
        if record["status"] == "ok" and result.get("benchmark") == "step_throughput":
            for name in REPLICA:
                if name in result["configurations"]:
                    rate = result["configurations"][name]["images_per_sec"]
                    replica[(result["phase"], name)] = rate
    steps, peers = [], []
    for name, record in parts.items():
        result = record.get("result") or {}
        if record["status"] != "ok" or result.get("benchmark") != "step_throughput":
            continue
        figures = record["figures"]
        if all(f"{c}/ms_per_step" in figures for c in PEER):
            peers.append(summarize_peer(name, result, figures))
        if "effpipe/noaug/synthetic/ms_per_step" in figures:
            steps.append(summarize_step(name, result, figures, replica))
    summary = {
        "steps": steps,
        "peers": peers,
        "replica_images_per_sec": {f"phase{p}/{n}": v for (p, n), v in replica.items()},
    }
    for peer in peers:
        if peer["part"].startswith("peer_"):
            summary[f"target_phase{peer['phase']}_speedup_vs_keras_recipe"] = {
                "value": peer["speedup_vs_keras_recipe"],
                "limit": PEER_TARGET_SPEEDUP,
                "met": peer["speedup_vs_keras_recipe"] >= PEER_TARGET_SPEEDUP,
            }
    headline = [step for step in steps if step["part"] == "step_p1_mixed_xla_on"]
    speedup = headline[0]["fed_speedup_vs_replica_as_run"] if headline else None
    if speedup is not None:
        summary["target_phase1_speedup_vs_replica_as_run"] = {
            "value": speedup,
            "limit": PHASE1_TARGET_SPEEDUP,
            "met": speedup >= PHASE1_TARGET_SPEEDUP,
        }
    return summary


def summarize_step(name: str, result: dict, figures: dict, replica: dict) -> dict:
    """One part's effpipe compute and fed steps against the replica of its phase."""
    phase = result["phase"]
    compute = figures["effpipe/noaug/synthetic/images_per_sec"]
    fed = figures.get("effpipe/noaug/pipeline/images_per_sec")
    notebook, notebook_fed = (replica.get((phase, f"notebook/{c}")) for c in ("synthetic", "numpy"))
    return {
        "part": name,
        "phase": phase,
        "precision": result["precision"],
        "xla": result["xla"],
        "batch_size": result["batch_size"],
        "ms_per_step": figures["effpipe/noaug/synthetic/ms_per_step"],
        "images_per_sec": compute,
        "peak_memory_mb": figures.get("effpipe/noaug/synthetic/peak_memory_mb"),
        "fed_ms_per_step": figures.get("effpipe/noaug/pipeline/ms_per_step"),
        "speedup_vs_replica": compute / notebook if notebook else None,
        "fed_speedup_vs_replica_as_run": fed / notebook_fed if fed and notebook_fed else None,
        "augment_share_of_step": figures.get("target/augment_share_of_step"),
    }


def summarize_peer(name: str, result: dict, figures: dict) -> dict:
    """One part's effpipe (fed, augmenting) against the keras_recipe peer."""
    effpipe_ms, peer_ms = (figures[f"{c}/ms_per_step"] for c in PEER)
    return {
        "part": name,
        "phase": result["phase"],
        "precision": result["precision"],
        "xla": result["xla"],
        "ms_per_step": effpipe_ms,
        "images_per_sec": figures[f"{PEER[0]}/images_per_sec"],
        "keras_recipe_ms_per_step": peer_ms,
        "keras_recipe_images_per_sec": figures[f"{PEER[1]}/images_per_sec"],
        "speedup_vs_keras_recipe": peer_ms / effpipe_ms,
    }


def print_summary(report: dict) -> None:
    rows = []
    for name, record in report["parts"].items():
        note = record.get("reason") or record.get("error") or ""
        if not note and record["status"] != "ok":
            note = (record.get("stderr_tail") or [""])[-1][:100]
        rows.append([name, record["status"], record["wall_s"], note])
    harness.print_table(["part", "status", "wall s", "note"], rows)
    steps = report["summary"]["steps"]
    if steps:
        print()
        harness.print_table(
            ["phase", "precision", "XLA", "batch", "ms/step", "images/s", "peak MB",
             "fed ms/step", "x replica", "x replica fed", "aug share"],
            [[s["phase"], s["precision"], "on" if s["xla"] else "off", s["batch_size"],
              s["ms_per_step"],
              s["images_per_sec"], s["peak_memory_mb"], s["fed_ms_per_step"],
              s["speedup_vs_replica"], s["fed_speedup_vs_replica_as_run"],
              s["augment_share_of_step"]] for s in steps],
        )  # fmt: skip
    peers = report["summary"]["peers"]
    if peers:
        print()
        harness.print_table(
            ["peer part", "phase", "precision", "XLA", "ms/step", "keras_recipe ms/step",
             "x keras_recipe"],
            [[p["part"], p["phase"], p["precision"], "on" if p["xla"] else "off",
              p["ms_per_step"], p["keras_recipe_ms_per_step"], p["speedup_vs_keras_recipe"]]
             for p in peers],
        )  # fmt: skip
    headline = report["parts"].get("headline", {})
    if headline.get("status") == "ok":
        print()
        print_headline(headline["result"])
    target = report["summary"].get("target_phase1_speedup_vs_replica_as_run")
    if target:
        print(
            f"target: phase-1 step (mixed, XLA, fed) {target['value']:.2f}x the replica as it "
            f"ran, against {target['limit']:g}x: {'met' if target['met'] else 'MISSED'}"
        )
    for phase in (1, 2):
        target = report["summary"].get(f"target_phase{phase}_speedup_vs_keras_recipe")
        if target:
            print(
                f"target: phase-{phase} step (mixed, XLA, fed, augmenting) {target['value']:.2f}x "
                f"keras_recipe, against {target['limit']:g}x: "
                f"{'met' if target['met'] else 'MISSED'}"
            )


def print_headline(result: dict) -> None:
    """The headline run's waits and, with its profile, phase 1's heaviest device ops."""
    first = result["first_step_seconds"]
    print(
        f"headline run: start to phase 1 {result['startup_seconds']:.0f} s; first step "
        f"{first['phase1']:.0f} s after phase 1's start, {first['phase2']:.0f} s after "
        f"phase 2's; the command {result['wall_seconds']:.0f} s"
    )
    profile = result.get("profile")
    if profile:
        print(
            f"phase-1 profile ({profile['steps']} steps, {profile['device']}): "
            f"{profile['trace_ms_per_step']:.1f} ms/step traced, device busy "
            f"{profile['device_busy_ms_per_step']:.1f}, waiting for input "
            f"{profile['input_wait_ms_per_step']:.1f}"
        )
        harness.print_table(
            ["op", "ms", "count", "share"],
            [[op["name"], op["total_ms"], op["count"], op["share"]] for op in profile["top_ops"]],
        )


if __name__ == "__main__":
    harness.run_main(PROGRAM, main)
