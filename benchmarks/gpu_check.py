"""One command for the GPU figures: every measurement the README still lacks, under 8 min.

    python -m benchmarks.gpu_check                    # on one GPU: runs/gpu_check.json
    python -m benchmarks.gpu_check --smoke            # any machine: every kind of part, tiny
    python -m benchmarks.gpu_check --parts=step_p1_float32_xla_on,step_p2_float32_xla_on

Prints the GPU's name (nvidia-smi, and TensorFlow's view, asked in a subprocess),
then runs each part as its own subprocess with its own timeout, cut to what is left
of a total deadline (--deadline_s); a part that no longer fits is skipped and
recorded as skipped. After every part it rewrites --output, a JSON file with, per
part: status (ok, failed with its last stderr lines, timed_out, skipped with the
reason, interrupted), wall seconds, the command, the part's figures (finite
numbers) and its final JSON line as printed; each part's full stdout and stderr are
kept in <output>_logs/. It ends with a summary table. SIGTERM or Ctrl-C kills the
running parts and still writes the file. Without a GPU (and without --smoke) it says
so in one line and exits 0; a GPU that nvidia-smi lists but this TensorFlow cannot
use (a CPU-only build) is one line on stderr and exit status 1, not a run on the CPU.

The parts, in the order they run (B5 at 456 px, batch 32, --unfreeze_blocks=4 as
flags/b5_rtx3070.flags; random weights and the offline shapes data, since the
GPU machine has no network):

  smoke_run          effpipe.train on flags/smoke.flags (B0 at 64 px, one epoch per
                     phase) with float16 (loss scaling) and XLA: metrics.json's top1 and
                     loss must be finite, its precision mixed_float16 with loss scaling,
                     its xla true.
  tuner_estimate     effpipe.tune_batch --method=estimated for flags/b5_rtx3070.flags
                     (mixed precision, augmentation) under an 8 GB card: each phase's
                     largest batch by the analytical estimate (host only, GPU hidden).
  tuner_trial_phase1 one measured trial per phase (--trial_batch), capped at the 8 GB
  tuner_trial_phase2 budget, at the estimate's answer: measured allocator peak against
                     the estimate's MiB (estimate_error = estimated / measured - 1) and
                     whether it fit. If it does not, a *_fallback trial at the largest
                     power of two below, whose estimate the search also probed.
  step_*             benchmarks.step_throughput, one process per phase x precision x
                     XLA, timing only the configurations it needs (--configurations):
                     the headline settings time compute (synthetic) and fed (pipeline)
                     steps, phase 1 mixed + XLA also augmentation's share; the float32,
                     XLA-off settings (the notebook's own) also time the notebook replica
                     (its base in host memory, float32, no XLA); the other four settings
                     time the compute step only. The summary divides the replica's
                     ms/step by each setting's, on the same GPU.
  augment            benchmarks.augment_throughput at its defaults (224 and 456 px).

The smoke run and the tuner do not time anything that the others could disturb
(the smoke run's figures are accuracy and finiteness, a trial's its own process's
allocator peak), so they run together first, with the smoke run's GPU memory
allowed to grow so the trials' 8 GB caps always fit beside it; every timed part runs
alone after them.

Time plan, for one H200 (no GPU has been lent to this project's sessions yet, so
these are estimates to be replaced by the wall seconds this command records; the
deadline, not the plan, keeps the whole under 8 minutes). Each process pays ~10 s
of TensorFlow import, CUDA start and B5 build; a B5 train step costs ~15 s of
tracing and, with XLA, up to a minute or more of compilation at 456 px (less in
phase 1, whose frozen base has no backward pass); the timed steps themselves are
seconds (2 repeats x 6 steps after a warm-up repeat, per configuration):

  GPU names: nvidia-smi, and TensorFlow in a subprocess             ~10 s
  untimed stage, together, cut at 200 s: smoke_run ~60 s | tuner_estimate
    ~20 s, then the two trials side by side (B5 + XLA at the estimate's
    batch: 213 for phase 1, 57 for phase 2, as estimated here)   ~120 s
  step_p1_mixed_xla_on     two models (plain, augmenting), XLA        ~100 s
  step_p1_float32_xla_off  one model + the replica, no XLA             ~60 s
  step_p2_mixed_xla_on     one model, XLA through 4 blocks             ~80 s
  augment                  7 small compiled steps x 2 sizes            ~40 s
  (about 410 s so far)
  step_p2_float32_xla_off  one model + the replica                     ~60 s
  step_p1_mixed_xla_off, step_p2_mixed_xla_off                      ~40 s each
  step_p1_float32_xla_on, step_p2_float32_xla_on                    ~70 s each

so at the default --deadline_s=450 the last settings are likely skipped on a first
run; --parts reruns exactly those. The order puts first what the README's "GPU: not
measured yet" paragraphs need: the 5x target (phase-1 effpipe, mixed + XLA, fed,
against the replica as the notebook ran it), the phase-2 step, augmentation, the
tuner's error; then the remaining precision x XLA cells.

--smoke runs the same code at a tiny scale on the CPU: the smoke run at 32 px, batch
4, without XLA (8x slower on a CPU); a B0 estimate and CPU trials at batch 4 (their
"peak" is the process's RSS, so their error means nothing); the benchmarks' own
--smoke modes (B0 at 32 px, batch 4), of the step settings only two, both without
XLA: step_p1_float32_xla_off (with the replica) and step_p2_mixed_xla_off. It took
149 s on this project's 2 shared CPU cores (load average 5), 270-290 s at load 6-7.
"""

import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures

from absl import flags

from benchmarks import harness, part_runner
from benchmarks.part_runner import Part, Runner

PROGRAM = "benchmarks.gpu_check"

_OUTPUT = flags.DEFINE_string("output", "runs/gpu_check.json", "The JSON file of all figures.")
_DEADLINE_S = flags.DEFINE_float(
    "deadline_s", 450.0, "Total seconds; no part runs past it (the script then stops)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Every kind of part at a tiny scale, on any machine.")
_PARTS = flags.DEFINE_list("parts", [], "Run only these parts (names as in the docstring).")

# benchmarks.step_throughput.GPU_PHASE1_TARGET_SPEEDUP (not imported: that module
# loads TensorFlow): effpipe's phase-1 step, fed, against the replica as it ran.
PHASE1_TARGET_SPEEDUP = 5.0
# Seconds the untimed stage (smoke run, tuner) may take on a GPU, of the deadline.
UNTIMED_STAGE_S = 200
# The step benchmark's timing per configuration: one warm-up repeat, then these.
STEP_REPEATS, STEP_STEPS_PER_REPEAT = 2, 6
STEP_MODEL_FLAGS = ["--variant=b5", "--image_size=456", "--batch_size=32", "--unfreeze_blocks=4"]
TUNER_FLAGS = ["--flagfile=flags/b5_rtx3070.flags", "--memory_budget_gb=8"]
SMOKE_TUNER_FLAGS = ["--variant=b0", "--image_size=32", "--memory_budget_gb=8", "--max_batch=4"]
NOAUG = ["effpipe/noaug/synthetic", "effpipe/noaug/pipeline"]
AUG = ["effpipe/aug/synthetic", "effpipe/aug/pipeline"]
REPLICA = ["notebook/synthetic", "notebook/numpy", "notebook/generator"]
# name, phase, mixed precision, XLA, configurations, (timeout s, least s worth starting).
STEP_SETTINGS = [
    ("step_p1_mixed_xla_on", 1, True, "on", NOAUG + AUG, (240, 100)),
    ("step_p1_float32_xla_off", 1, False, "off", NOAUG + REPLICA, (180, 60)),
    ("step_p2_mixed_xla_on", 2, True, "on", NOAUG, (240, 80)),
    ("step_p2_float32_xla_off", 2, False, "off", NOAUG + REPLICA, (180, 60)),
    ("step_p1_mixed_xla_off", 1, True, "off", NOAUG[:1], (120, 35)),
    ("step_p2_mixed_xla_off", 2, True, "off", NOAUG[:1], (120, 40)),
    ("step_p1_float32_xla_on", 1, False, "on", NOAUG[:1], (180, 60)),
    ("step_p2_float32_xla_on", 2, False, "on", NOAUG[:1], (180, 70)),
]
SMOKE_STEP_PARTS = ("step_p1_float32_xla_off", "step_p2_mixed_xla_off")
TIMED_ORDER = (
    [name for name, *_ in STEP_SETTINGS[:3]]
    + ["augment"]
    + [name for name, *_ in STEP_SETTINGS[3:]]
)
PART_NAMES = ["smoke_run", "tuner_estimate", "tuner_trial_phase1", "tuner_trial_phase2"]
PART_NAMES += TIMED_ORDER


# --- What each part's output must hold. ---


def finite(name: str, value) -> float:
    """`value` if it is a finite number; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a finite number")
    return value


def require_json(result: dict | None, benchmark: str | None = None) -> dict:
    if result is None:
        raise ValueError("no JSON object on its last stdout line")
    if benchmark and result.get("benchmark") != benchmark:
        raise ValueError(f"its JSON line is not {benchmark}'s")
    return result


def read_step(result: dict | None) -> dict:
    """ms/step, images/s and (GPU) peak MB per configuration; the targets' values."""
    result = require_json(result, "step_throughput")
    figures = {}
    for name, values in result["configurations"].items():
        for key in ("ms_per_step", "images_per_sec", "peak_memory_mb", "input_bound_fraction"):
            if values.get(key) is not None:
                figures[f"{name}/{key}"] = finite(f"{name} {key}", values[key])
    for name, check in result["targets"].items():
        figures[f"target/{name}"] = finite(name, check["value"])
    return figures


def read_augment(result: dict | None) -> dict:
    """Per size: the fused path's and Keras' chain's images/s and their ratio."""
    result = require_json(result, "augment_throughput")
    figures = {}
    for size, values in result["sizes"].items():
        for key in ("fused_images_per_sec", "keras_chain_images_per_sec", "speedup"):
            figures[f"{size}px/{key}"] = finite(f"{size} px {key}", values[key])
    return figures


def read_estimate(result: dict | None) -> dict:
    """Each phase's estimated largest batch and the estimate's MiB at it."""
    result = require_json(result)
    figures = {"usable_mib": finite("usable_mib", result["usable_mib"])}
    for phase in (1, 2):
        estimate = result["estimate"][f"phase{phase}"]
        figures[f"phase{phase}_max_batch"] = finite("max_batch", estimate["max_batch"])
        terms = estimate["mib_at_max_batch"]
        if terms:
            figures[f"phase{phase}_estimated_mib"] = finite("estimated MiB", terms["total"])
            # The share of the estimate kept for fragmentation and workspaces.
            figures[f"phase{phase}_estimated_margin_mib"] = finite("margin", terms["margin"])
    return figures


def estimated_mib_at(estimate: dict, phase: int, batch_size: int) -> float | None:
    """The estimate's MiB for `phase` at `batch_size`, if its search probed that batch."""
    for trial in estimate["trials"]:
        if trial["phase"] == phase and trial["batch_size"] == batch_size:
            return trial["estimated_mib"]
    return None


def make_trial_reader(batch_size: int, estimated_mib: float) -> Callable[[dict | None], dict]:
    def read(result: dict | None) -> dict:
        result = require_json(result)
        if "error" in result:
            raise ValueError(f"the trial failed: {result['error']}")
        figures = {"batch_size": batch_size, "fits": bool(result["fits"])}
        figures["estimated_mib"] = finite("estimated_mib", estimated_mib)
        # A trial out of GPU memory has no peak; one on a CPU always has one.
        if result["fits"] or result.get("peak_mib") is not None:
            peak = finite("peak_mib", result["peak_mib"])
            figures["peak_mib"] = peak
            # Above 0: the estimate asks for more than the step took (the safe side).
            figures["estimate_error"] = estimated_mib / peak - 1.0
        return figures

    return read


def make_smoke_reader(workdir: str, copy_to: str, expected_xla: bool):
    """Reads the trainer's metrics.json (the trainer prints no JSON line) and keeps a
    copy at `copy_to`; the run directory itself is deleted after the part."""

    def read(result: dict | None) -> dict:
        del result
        with open(os.path.join(workdir, "metrics.json")) as file:
            metrics = json.load(file)
        with open(copy_to, "w") as file:
            json.dump(metrics, file, indent=1)
        figures = {key: finite(key, metrics[key]) for key in ("top1", "top5", "loss")}
        figures["train_images_per_sec"] = finite("images/s", metrics["train_images_per_sec"])
        ran = (metrics["precision"], metrics["loss_scaling"], metrics["xla"])
        if ran != ("mixed_float16", True, expected_xla):
            raise ValueError(
                f"metrics.json says precision {ran[0]}, loss scaling {ran[1]}, xla {ran[2]}; "
                f"asked mixed_float16 with loss scaling, xla {expected_xla}"
            )
        figures["loss_scaling"], figures["xla"] = metrics["loss_scaling"], metrics["xla"]
        return figures

    return read


# --- The plan. ---


def step_part(name, phase, mixed, xla, configurations, limits, smoke) -> Part:
    scale = ["--smoke"] if smoke else [
        *STEP_MODEL_FLAGS, f"--repeats={STEP_REPEATS}",
        f"--steps_per_repeat={STEP_STEPS_PER_REPEAT}",
    ]  # fmt: skip
    argv = ["-m", "benchmarks.step_throughput", *scale, f"--phase={phase}"]
    argv += ["--mixed_precision" if mixed else "--nomixed_precision", f"--xla={xla}"]
    argv += [f"--configurations={','.join(configurations)}"]
    timeout_s, needs_s = (300, 0) if smoke else limits
    return Part(name, argv, timeout_s, needs_s, read_step)


def make_timed_parts(smoke: bool) -> list[Part]:
    """The parts that time steps, in the order they run (each alone)."""
    steps = {
        setting[0]: step_part(*setting, smoke)
        for setting in STEP_SETTINGS
        if not smoke or setting[0] in SMOKE_STEP_PARTS
    }
    augment = Part(
        "augment",
        ["-m", "benchmarks.augment_throughput", *(["--smoke"] if smoke else [])],
        300 if smoke else 120,
        0 if smoke else 40,
        read_augment,
    )
    return [augment if name == "augment" else steps[name] for name in TIMED_ORDER if
            name == "augment" or name in steps]  # fmt: skip


def make_smoke_run_part(smoke: bool, workdir: str, logs: str) -> Part:
    xla = "off" if smoke else "on"
    argv = ["-m", "effpipe.train", "--flagfile=flags/smoke.flags", "--mixed_precision"]
    argv += ["--mixed_precision_dtype=float16", f"--xla={xla}", f"--workdir={workdir}"]
    if smoke:
        argv += ["--image_size=32", "--batch_size=4", "--shapes_train_examples=40"]
        argv += ["--shapes_test_examples=8", "--noexport"]
    # Its memory grows as needed: the tuner's capped trials run beside it.
    env = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    return Part(
        "smoke_run", argv, 300 if smoke else 150, 0 if smoke else 60,
        make_smoke_reader(workdir, os.path.join(logs, "smoke_run.metrics.json"), xla == "on"),
        env,
    )  # fmt: skip


def make_estimate_part(smoke: bool) -> Part:
    argv = ["-m", "effpipe.tune_batch", *(SMOKE_TUNER_FLAGS if smoke else TUNER_FLAGS)]
    argv += ["--method=estimated", "--phase=both", "--cpu_trial_batch=0", "--output="]
    return Part(
        "tuner_estimate", argv, 300 if smoke else 90, 0 if smoke else 30, read_estimate,
        {"TF_FORCE_GPU_ALLOW_GROWTH": "true"},
    )  # fmt: skip


def make_trial_part(smoke, name, phase, batch_size, estimated_mib) -> Part:
    argv = ["-m", "effpipe.tune_batch", *(SMOKE_TUNER_FLAGS if smoke else TUNER_FLAGS)]
    argv += [f"--trial_batch={batch_size}", f"--phase={phase}", "--trial_steps=3"]
    return Part(
        name, argv, 300 if smoke else 180, 0 if smoke else 90,
        make_trial_reader(batch_size, estimated_mib),
    )  # fmt: skip


def run_tuner_trials(runner: Runner, smoke: bool, estimate: dict, by: float) -> None:
    """Per phase, side by side: a trial at the estimate's answer, and a fallback below
    it when that one does not fit; all ending by `by` (time.monotonic())."""

    def trials_of(phase: int) -> None:
        name = f"tuner_trial_phase{phase}"
        if estimate["status"] != "ok":
            runner.skip(name, f"needs tuner_estimate ({estimate['status']})")
            return
        batch_size = int(estimate["figures"][f"phase{phase}_max_batch"])
        if batch_size < 1:
            runner.skip(name, "the estimate says no batch fits")
            return
        mib = estimate["figures"][f"phase{phase}_estimated_mib"]
        record = runner.run(make_trial_part(smoke, name, phase, batch_size, mib), by)
        # Below it only when it did not fit, or died without an answer (the kernel's
        # OOM killer); not after a timeout, an interruption or a reported error.
        did_not_fit = record["status"] == "ok" and not record["figures"]["fits"]
        died = record["status"] == "failed" and record["result"] is None
        if not (did_not_fit or died):
            return
        # The doubling search probed every power of two up to its answer.
        fallback = 2 ** ((batch_size - 1).bit_length() - 1) if batch_size > 1 else 0
        mib = estimated_mib_at(estimate["result"], phase, fallback) if fallback else None
        if mib is None:
            return
        runner.run(make_trial_part(smoke, f"{name}_fallback", phase, fallback, mib), by)

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(trials_of, (1, 2)))


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
    smi_gpus, smi_note = nvidia_smi_gpus()
    # --smoke runs wherever it is, at a scale where the device does not matter.
    tf_gpus = [] if smoke else tensorflow_gpus()
    if not tf_gpus and not smoke:
        line, status = no_gpu_line(smi_gpus, smi_note)
        print(line, file=sys.stderr if status else sys.stdout)
        sys.exit(status)
    output = os.path.abspath(_OUTPUT.value)
    names = [gpu["name"] for gpu in tf_gpus or smi_gpus] or ["none"]
    print(
        f"gpu_check{' --smoke (tiny scale, plumbing only)' if smoke else ''}: GPU "
        f"{', '.join(names)}; deadline {_DEADLINE_S.value:.0f} s; writing {output}",
        flush=True,
    )
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
    # Untimed parts side by side: the smoke run; the estimate, then the trials.
    smoke_workdir = tempfile.mkdtemp(prefix="gpu_check_smoke_run_")
    try:
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            smoke_part = make_smoke_run_part(smoke, smoke_workdir, runner.logs)
            # The untimed stage ends by then, however its parts go, so that the timed
            # parts keep their share of the deadline.
            by = None if smoke else time.monotonic() + UNTIMED_STAGE_S
            smoke_run = pool.submit(runner.run, smoke_part, by)
            estimate = runner.run(make_estimate_part(smoke), by)
            run_tuner_trials(runner, smoke, estimate, by)
            smoke_run.result()
    finally:
        shutil.rmtree(smoke_workdir, ignore_errors=True)
    # Timed parts, one at a time.
    for part in make_timed_parts(smoke):
        runner.run(part)

    report["summary"] = summarize(report["parts"])
    report["finished"] = not part_runner.STOPPED_BY
    report["wall_s"] = round(time.monotonic() - started, 1)
    runner.write()
    print_summary(report)
    print(f"gpu_check: wrote {output} in {report['wall_s']:.0f} s")
    if part_runner.STOPPED_BY:
        sys.exit(128 + part_runner.STOPPED_BY[0])


def summarize(parts: dict) -> dict:
    """The step settings side by side, each against the replica of its phase."""
    replica = {}
    for record in parts.values():
        result = record.get("result") or {}
        if record["status"] == "ok" and result.get("benchmark") == "step_throughput":
            for name in REPLICA:
                if name in result["configurations"]:
                    replica[(result["phase"], name)] = result["configurations"][name]["ms_per_step"]
    steps = []
    for name, record in parts.items():
        result = record.get("result") or {}
        if record["status"] != "ok" or result.get("benchmark") != "step_throughput":
            continue
        figures, phase = record["figures"], result["phase"]
        compute = figures["effpipe/noaug/synthetic/ms_per_step"]
        fed = figures.get("effpipe/noaug/pipeline/ms_per_step")
        notebook_compute, notebook_fed = (
            replica.get((phase, "notebook/synthetic")),
            replica.get((phase, "notebook/numpy")),
        )
        steps.append(
            {
                "part": name,
                "phase": phase,
                "precision": result["precision"],
                "xla": result["xla"],
                "ms_per_step": compute,
                "images_per_sec": figures["effpipe/noaug/synthetic/images_per_sec"],
                "peak_memory_mb": figures.get("effpipe/noaug/synthetic/peak_memory_mb"),
                "fed_ms_per_step": fed,
                "speedup_vs_replica": notebook_compute / compute if notebook_compute else None,
                "fed_speedup_vs_replica_as_run": notebook_fed / fed
                if notebook_fed and fed
                else None,
                "augment_share_of_step": figures.get("target/augment_share_of_step"),
            }
        )
    summary = {
        "steps": steps,
        "replica_ms_per_step": {f"phase{p}/{n}": v for (p, n), v in replica.items()},
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
            ["phase", "precision", "XLA", "ms/step", "images/s", "peak MB", "fed ms/step",
             "x replica", "x replica fed", "aug share"],
            [[s["phase"], s["precision"], "on" if s["xla"] else "off", s["ms_per_step"],
              s["images_per_sec"], s["peak_memory_mb"], s["fed_ms_per_step"],
              s["speedup_vs_replica"], s["fed_speedup_vs_replica_as_run"],
              s["augment_share_of_step"]] for s in steps],
        )  # fmt: skip
    trials = [
        (name, record["figures"]) for name, record in report["parts"].items()
        if name.startswith("tuner_trial") and record["status"] == "ok"
    ]  # fmt: skip
    if trials:
        print()
        harness.print_table(
            ["trial", "batch", "fits", "peak MiB", "estimated MiB", "estimate error"],
            [[name, f["batch_size"], "yes" if f["fits"] else "no", f.get("peak_mib"),
              f["estimated_mib"], f.get("estimate_error")] for name, f in trials],
        )  # fmt: skip
    target = report["summary"].get("target_phase1_speedup_vs_replica_as_run")
    if target:
        print(
            f"target: phase-1 step (mixed, XLA, fed) {target['value']:.2f}x the replica as it "
            f"ran, against {target['limit']:g}x: {'met' if target['met'] else 'MISSED'}"
        )


if __name__ == "__main__":
    harness.run_main(PROGRAM, main)
