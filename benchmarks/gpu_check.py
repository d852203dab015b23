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

from benchmarks import gpu_check_parts, gpu_check_report, harness, part_runner, records
from benchmarks.gpu_check_parts import PART_NAMES
from benchmarks.part_runner import Runner

PROGRAM = "benchmarks.gpu_check"

_OUTPUT = flags.DEFINE_string("output", "runs/gpu_check.json", "The JSON file of all figures.")
_DEADLINE_S = flags.DEFINE_float(
    "deadline_s", 450.0, "Total seconds; no part runs past it (the script then stops)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Every kind of part at a tiny scale, on any machine.")
_PARTS = flags.DEFINE_list("parts", [], "Run only these parts (names as the plan lists them).")
flags.adopt_module_key_flags(records)

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
        if part.name.endswith("_8gb"):  # At the estimate's batch, known only now.
            name, estimate = part.name, report["parts"].get("tuner_estimate", {})
            part = gpu_check_parts.at_batch(name, estimate, smoke)
            if isinstance(part, str):
                runner.skip(name, part)
                continue
        runner.run(part)

    report["summary"] = gpu_check_report.summarize(report["parts"])
    report["finished"] = not part_runner.STOPPED_BY
    report["wall_s"] = round(time.monotonic() - started, 1)
    runner.write()
    gpu_check_report.print_summary(report)
    print(f"gpu_check: wrote {output} in {report['wall_s']:.0f} s")
    gpu_check_report.record_gpu_check(report)
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


if __name__ == "__main__":
    harness.run_main(PROGRAM, main)
