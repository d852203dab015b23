"""The parts of `benchmarks.gpu_check`: what each runs and what its output must hold.

No flags, no TensorFlow import. The parts, in the order they run (B5 at 456 px,
batch 32, --unfreeze_blocks=4 as flags/b5_rtx3070.flags; random weights and the
offline shapes data, since the GPU machine has no network):

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
                     XLA (STEP_SETTINGS), timing only the configurations it needs: the
                     headline settings time compute (synthetic) and fed (pipeline)
                     steps, phase 1 mixed + XLA also augmentation's share; the float32,
                     XLA-off settings (the notebook's own) also time the notebook
                     replica; the other four time the compute step only.
  peer_*             benchmarks.step_throughput, phase 1 and phase 2 with mixed
                     precision and XLA: effpipe fed and augmenting against the
                     keras_recipe peer (what the keras-io guide has a user write).
  augment            benchmarks.augment_throughput at its defaults (224 and 456 px).

The smoke run and the tuner time nothing the others could disturb, so they run
together first (the smoke run's GPU memory allowed to grow, so the trials' 8 GB caps
fit beside it); every timed part runs alone after them. TIMED_ORDER puts first what
the README's GPU tables need most: the 5x target (phase 1, mixed + XLA, fed, against
the replica as the notebook ran it), the phase-2 step, the peer in both phases,
augmentation; then the other precision x XLA cells. Each part's (timeout, least seconds worth starting) assume one
H200: ~10 s of TensorFlow import and CUDA start per process, ~15 s of tracing per B5
train step and up to a minute or more of XLA compilation at 456 px.

With smoke=True the same parts run at a tiny scale on any machine: the smoke run at
32 px, batch 4, without XLA; a B0 estimate and CPU trials at batch 4 (their "peak" is
the process's RSS, so their error means nothing); the benchmarks' own --smoke modes,
of the step settings only SMOKE_STEP_PARTS, both without XLA; the first of them
times every configuration of benchmarks.step_throughput, so that one smoke run
checks the whole step benchmark (tests/test_gpu_check.py).
"""

import json
import math
import os
from collections.abc import Callable
from concurrent import futures

from benchmarks.part_runner import Part, Runner

# The step benchmark's timing per configuration: one warm-up repeat, then these.
STEP_REPEATS, STEP_STEPS_PER_REPEAT = 2, 6
STEP_MODEL_FLAGS = ["--variant=b5", "--image_size=456", "--batch_size=32", "--unfreeze_blocks=4"]
TUNER_FLAGS = ["--flagfile=flags/b5_rtx3070.flags", "--memory_budget_gb=8"]
SMOKE_TUNER_FLAGS = ["--variant=b0", "--image_size=32", "--memory_budget_gb=8", "--max_batch=4"]
NOAUG = ["effpipe/noaug/synthetic", "effpipe/noaug/pipeline"]
AUG = ["effpipe/aug/synthetic", "effpipe/aug/pipeline"]
REPLICA = ["notebook/synthetic", "notebook/numpy", "notebook/generator"]
# The peer and its like: both fed from the same uint8 images, both augmenting.
PEER = ["effpipe/aug/pipeline", "keras_recipe"]
# name, phase, mixed precision, XLA, configurations, (timeout s, least s worth starting).
STEP_SETTINGS = [
    ("step_p1_mixed_xla_on", 1, True, "on", NOAUG + AUG, (240, 100)),
    ("step_p1_float32_xla_off", 1, False, "off", NOAUG + REPLICA, (180, 60)),
    ("step_p2_mixed_xla_on", 2, True, "on", NOAUG, (240, 80)),
    # Two models, each compiled with XLA.
    ("peer_p1_mixed_xla_on", 1, True, "on", PEER, (300, 150)),
    ("peer_p2_mixed_xla_on", 2, True, "on", PEER, (300, 150)),
    ("step_p2_float32_xla_off", 2, False, "off", NOAUG + REPLICA, (180, 60)),
    ("step_p1_mixed_xla_off", 1, True, "off", NOAUG[:1], (120, 35)),
    ("step_p2_mixed_xla_off", 2, True, "off", NOAUG[:1], (120, 40)),
    ("step_p1_float32_xla_on", 1, False, "on", NOAUG[:1], (180, 60)),
    ("step_p2_float32_xla_on", 2, False, "on", NOAUG[:1], (180, 70)),
]
SMOKE_STEP_PARTS = ("step_p1_float32_xla_off", "step_p2_mixed_xla_off")
TIMED_ORDER = (
    [name for name, *_ in STEP_SETTINGS[:5]]
    + ["augment"]
    + [name for name, *_ in STEP_SETTINGS[5:]]
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
    if not (smoke and name == SMOKE_STEP_PARTS[0]):
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
