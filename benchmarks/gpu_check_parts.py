"""The parts of `benchmarks.gpu_check`: what each runs and what its output must hold.

No flags, no TensorFlow import. The parts, in the order they run, one at a time (B5 at
456 px, mixed precision, --unfreeze_blocks=4 as flags/b5_rtx3070.flags; random weights
and the offline shapes data, since the GPU machine has no network):

  headline           benchmarks.headline_run: `python -m effpipe.train --variant=b5
                     --mixed_precision` end to end (6 steps per phase, validation, test,
                     the export), the seconds from each phase's start to its first step,
                     and the summary of phase 1's profiler trace (steps 3-5: top device
                     ops, device busy time and input wait per step).
  step_p1_mixed_xla_on   benchmarks.step_throughput at batch 32: effpipe's compute and
  step_p2_mixed_xla_on   fed steps, phase 1 also augmenting (the augmentation's share).
  peer_p1_mixed_xla_on   effpipe fed and augmenting against the keras_recipe peer (what
  peer_p2_mixed_xla_on   the keras-io guide has a user write), each phase.
  tuner_estimate     effpipe.tune_batch --method=estimated for flags/b5_rtx3070.flags
                     under an 8 GB card: each phase's largest batch (host only).
  step_p1_8gb        phase 1 at the estimate's batch, with TensorFlow's allocator capped
                     at the 8 GB card's usable MiB: compute and fed steps, the peak.
  step_p1_float32_xla_off  the notebook's own setting: effpipe beside the notebook
                     replica (compute, fed as the notebook fed it, its generator).
  augment            benchmarks.augment_throughput at its defaults (224 and 456 px).
  step_p2_8gb        phase 2 at the estimate's batch, capped the same.
  headline_autotune0 the headline run again with XLA_FLAGS=--xla_gpu_autotune_level=0:
                     what XLA's autotuning costs of the wait for the first steps.

Each part's (timeout, least seconds worth starting) assume one H200: ~10 s of
TensorFlow import and CUDA start per process, ~15 s of tracing per B5 train step and a
minute or more of XLA compilation at 456 px. The deadline, not the plan, keeps the
whole under 8 minutes: the last parts are skipped when it runs out.

With smoke=True the same parts run at a tiny scale on any machine (B0, 32 px, batch
4, without XLA); the first step part times every configuration of the step benchmark,
so that one smoke run checks it whole (tests/test_gpu_check.py).
"""

import math

from benchmarks.part_runner import Part

# The step benchmark's timing per configuration: one warm-up repeat, then these.
STEP_REPEATS, STEP_STEPS_PER_REPEAT = 2, 6
STEP_MODEL_FLAGS = ["--variant=b5", "--image_size=456", "--unfreeze_blocks=4"]
TUNER_FLAGS = ["--flagfile=flags/b5_rtx3070.flags", "--memory_budget_gb=8"]
SMOKE_TUNER_FLAGS = ["--variant=b0", "--image_size=32", "--memory_budget_gb=8", "--max_batch=4"]
NOAUG = ["effpipe/noaug/synthetic", "effpipe/noaug/pipeline"]
AUG = ["effpipe/aug/synthetic", "effpipe/aug/pipeline"]
REPLICA = ["notebook/synthetic", "notebook/numpy", "notebook/generator"]
# The peer and its like: both fed from the same uint8 images, both augmenting.
PEER = ["effpipe/aug/pipeline", "keras_recipe"]
# name: phase, mixed precision, XLA, configurations, (timeout s, least s worth starting),
# what it measures.
STEP_SETTINGS = {
    "step_p1_mixed_xla_on": (1, True, "on", NOAUG + AUG, (240, 100), "compute, fed, augmenting"),
    "step_p2_mixed_xla_on": (2, True, "on", NOAUG, (240, 80), "compute, fed"),
    # Two models, each compiled with XLA.
    "peer_p1_mixed_xla_on": (1, True, "on", PEER, (300, 150), "augmenting, and keras_recipe"),
    "peer_p2_mixed_xla_on": (2, True, "on", PEER, (300, 150), "augmenting, and keras_recipe"),
    "step_p1_float32_xla_off": (
        1, False, "off", NOAUG + REPLICA, (180, 60), "compute, fed, and the notebook replica",
    ),
    # At the tuner's batch for an 8 GB card (the batch is set when known).
    "step_p1_8gb": (1, True, "on", NOAUG, (240, 100), "compute, fed at the estimate's batch"),
    "step_p2_8gb": (2, True, "on", NOAUG, (240, 100), "compute, fed at the estimate's batch"),
}  # fmt: skip
HEADLINE_PROFILE_STEPS = "3,5"
PART_NAMES = [
    "headline", "step_p1_mixed_xla_on", "step_p2_mixed_xla_on", "peer_p1_mixed_xla_on",
    "peer_p2_mixed_xla_on", "tuner_estimate", "step_p1_8gb", "step_p1_float32_xla_off",
    "augment", "step_p2_8gb", "headline_autotune0",
]  # fmt: skip
SMOKE_FIRST_STEP_PART = "step_p1_mixed_xla_on"

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
    figures = {"batch_size": result["batch_size"]}
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
    return figures


def read_headline(result: dict | None) -> dict:
    """The wait before each phase's first step, each phase's images/s, the export's
    size; with a profile, its per-step figures and heaviest ops."""
    result = require_json(result, "headline_run")
    figures = {"startup_seconds": finite("startup_seconds", result["startup_seconds"])}
    for phase in ("phase1", "phase2"):
        seconds = result["first_step_seconds"][phase]
        figures[f"first_step_seconds/{phase}"] = finite(f"{phase} first step", seconds)
        rate = result["images_per_sec"][phase]
        figures[f"images_per_sec/{phase}"] = finite(f"{phase} images/s", rate)
    figures["export_mb"] = finite("export_mb", result["export_mb"])
    if not figures["export_mb"] > 0:
        raise ValueError("the run wrote no export")
    figures["wall_seconds"] = finite("wall_seconds", result["wall_seconds"])
    profile = result.get("profile")
    if profile and "error" not in profile:
        for key in ("trace_ms_per_step", "device_busy_ms_per_step", "input_wait_ms_per_step"):
            figures[f"profile/{key}"] = finite(key, profile[key])
        for rank, op in enumerate(profile["top_ops"][:3], 1):
            figures[f"profile/top{rank}_share"] = finite("share", op["share"])
    return figures


# --- The plan. ---


def step_part(name: str, smoke: bool, batch_size: int = 32, memory_cap_mib: int = 0) -> Part:
    phase, mixed, xla, configurations, (timeout_s, needs_s), what = STEP_SETTINGS[name]
    scale = ["--smoke"] if smoke else [
        *STEP_MODEL_FLAGS, f"--batch_size={batch_size}", f"--repeats={STEP_REPEATS}",
        f"--steps_per_repeat={STEP_STEPS_PER_REPEAT}",
    ]  # fmt: skip
    argv = ["-m", "benchmarks.step_throughput", *scale, f"--phase={phase}"]
    argv += ["--mixed_precision" if mixed else "--nomixed_precision"]
    argv += [f"--xla={'off' if smoke else xla}"]
    if not (smoke and name == SMOKE_FIRST_STEP_PART):
        argv += [f"--configurations={','.join(configurations)}"]
    if memory_cap_mib:
        argv += [f"--memory_cap_mib={memory_cap_mib}"]
    what = f"step, phase {phase}, {'mixed' if mixed else 'float32'}, XLA {xla}: {what}"
    return Part(name, argv, 300 if smoke else timeout_s, 0 if smoke else needs_s, read_step,
                what=what)  # fmt: skip


def headline_part(smoke: bool, name: str = "headline") -> Part:
    argv = ["-m", "benchmarks.headline_run", f"--profile_steps={HEADLINE_PROFILE_STEPS}"]
    env, what = {}, "effpipe.train --variant=b5 --mixed_precision end to end; profile"
    if name == "headline_autotune0":
        argv, env = argv[:2], {"XLA_FLAGS": "--xla_gpu_autotune_level=0"}
        what = "the same without XLA's autotuning (--xla_gpu_autotune_level=0)"
    if smoke:
        argv = ["-m", "benchmarks.headline_run", "--smoke", "--profile_steps=2,2"]
    return Part(name, argv, 300, 0 if smoke else 150, read_headline, env, what)


def estimate_part(smoke: bool) -> Part:
    argv = ["-m", "effpipe.tune_batch", *(SMOKE_TUNER_FLAGS if smoke else TUNER_FLAGS)]
    argv += ["--method=estimated", "--phase=both", "--cpu_trial_batch=0", "--output="]
    return Part(
        "tuner_estimate", argv, 300 if smoke else 90, 0 if smoke else 30, read_estimate,
        what="each phase's largest batch for an 8 GB card (host only)",
    )  # fmt: skip


def augment_part(smoke: bool) -> Part:
    argv = ["-m", "benchmarks.augment_throughput", *(["--smoke"] if smoke else [])]
    return Part(
        "augment", argv, 300 if smoke else 120, 0 if smoke else 40, read_augment,
        what="the fused augmentation against Keras' layers",
    )  # fmt: skip


def make_plan(smoke: bool) -> list[Part]:
    """Every part in the order they run; the 8 GB steps at batch 32 until the
    estimate's answer replaces it (`at_batch`)."""
    parts = {"headline": headline_part(smoke), "tuner_estimate": estimate_part(smoke)}
    parts["augment"] = augment_part(smoke)
    parts["headline_autotune0"] = headline_part(smoke, "headline_autotune0")
    return [parts[name] if name in parts else step_part(name, smoke) for name in PART_NAMES]


def at_batch(name: str, estimate: dict, smoke: bool) -> Part | str:
    """The 8 GB step part `name` at the estimate's batch for its phase, or why it
    cannot run."""
    if estimate.get("status") != "ok":
        return f"needs tuner_estimate ({estimate.get('status', 'not run')})"
    phase = STEP_SETTINGS[name][0]
    batch_size = int(estimate["figures"][f"phase{phase}_max_batch"])
    if batch_size < 1:
        return "the estimate says no batch fits"
    # Capped as the tuner's trials are: out of memory here means it does not fit.
    return step_part(name, smoke, batch_size, int(estimate["figures"]["usable_mib"]))
