"""The headline command end to end on offline data: how long a user waits, phase by phase.

    python -m benchmarks.headline_run                      # B5 at 456 px, batch 32
    python -m benchmarks.headline_run --batch_size=4 --xla=on --results_dir=results
    python -m benchmarks.headline_run --profile_steps=2,4  # and phase 1's profile summary
    python -m benchmarks.headline_run --smoke              # B0 at 32 px: plumbing only

Runs `python -m effpipe.train --variant=b5 --mixed_precision` with what needs no
network: shapes images at 32 px (resized in the step, as CIFAR-100's are), a base of
random weights saved to a file (the pretrained-base path: BatchNormalization frozen, no
calibration), one epoch of --steps steps per phase, one batch of validation and one of
test images, and the export. Validation and test are whole batches, as the trainer
makes them (one compiled shape each). Reports, from the run's metrics.json and
history.json: the seconds from the trainer's start to phase 1 (data, model, weights),
from each phase's start to the end of its first step (tracing, XLA compilation and
autotuning included), each phase's steady images/s (its first call left out), the
export's size and the command's wall seconds; with --profile_steps, the summary of
phase 1's profiler trace (benchmarks.profile_summary: top device ops, input wait).
Environment variables reach the trainer (XLA_FLAGS=--xla_gpu_autotune_level=0, say).

Measured: results/headline_run-*.json (on the 2-core AMD EPYC: B5 at 456 px, batch 4,
bfloat16, with and without XLA).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import flags

from benchmarks import gpu_check_report, harness, records

PROGRAM = "benchmarks.headline_run"
# The trainer's own flags this benchmark passes on (effpipe.cli_flags defines them).
TRAINER_FLAGS = ("variant", "batch_size", "xla", "profile_steps")
_STEPS = flags.DEFINE_integer("steps", 6, "Train steps per phase (one epoch each).")
_SMOKE = flags.DEFINE_bool("smoke", False, "B0 at 32 px, batch 4, 2 steps, XLA off.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Keep the run here (default: a deleted temp dir).")
flags.adopt_module_key_flags(records)


def train_argv(variant, image_size, batch_size, steps, xla, weights, profile_steps, workdir):
    """The trainer's command: the headline flags, then the offline data."""
    return [
        sys.executable, "-m", "effpipe.train", f"--variant={variant}", "--mixed_precision",
        f"--image_size={image_size}", f"--batch_size={batch_size}", f"--xla={xla}",
        f"--weights={weights}", "--dataset=shapes",
        f"--shapes_num_classes={min(10, (steps + 1) * batch_size // 2)}",
        # steps + 1 batches, one of them validation; one batch of test images.
        f"--shapes_train_examples={(steps + 1) * batch_size}",
        f"--validation_fraction={1 / (steps + 1)!r}",
        f"--shapes_test_examples={batch_size}", "--phase1_epochs=1", "--phase2_epochs=1",
        f"--workdir={workdir}", *([f"--profile_steps={profile_steps}"] if profile_steps else []),
    ]  # fmt: skip


def main(argv):
    from effpipe import cli_flags
    from effpipe.config import FIELD_SLICES
    from effpipe.errors import UsageError

    cli_flags.refuse_arguments(PROGRAM, argv)
    given = [name for name in FIELD_SLICES if flags.FLAGS[name].present]
    if set(given) - set(TRAINER_FLAGS):
        raise UsageError(
            f"--{', --'.join(sorted(set(given) - set(TRAINER_FLAGS)))}: this benchmark sets "
            f"only --{', --'.join(TRAINER_FLAGS)} of the trainer's flags"
        )
    smoke, options = _SMOKE.value, flags.FLAGS
    variant = "b0" if smoke else (options.variant if options["variant"].present else "b5")
    image_size = 32 if smoke else 0
    batch_size, steps = (4, 2) if smoke else (options.batch_size, _STEPS.value)
    harness.require_positive(batch_size=batch_size, steps=steps)
    xla, profile_steps = "off" if smoke else options.xla, options.profile_steps
    with tempfile.TemporaryDirectory() as scratch:
        workdir = _WORKDIR.value or os.path.join(scratch, "run")
        weights = os.path.join(scratch, "base.weights.h5")
        _save_random_base(variant, image_size, weights)
        argv = train_argv(
            variant, image_size, batch_size, steps, xla, weights, profile_steps, workdir
        )
        print(f"headline_run: {shlex.join(argv[1:])}", flush=True)
        started = time.perf_counter()
        if subprocess.run(argv, stdout=sys.stderr).returncode:
            sys.exit("headline_run: the trainer failed (its log is above)")
        wall_seconds = time.perf_counter() - started
        payload = _read_run(workdir, steps, wall_seconds)
        payload["command"] = shlex.join(["python", *argv[1:]])
        if profile_steps:
            from benchmarks import profile_summary

            log_dir = os.path.join(workdir, "tensorboard", "phase1")
            try:
                payload["profile"] = profile_summary.summarize(log_dir)
            except (FileNotFoundError, ValueError) as error:  # The run's figures stand.
                payload["profile"] = {"error": str(error)}
    gpu_check_report.print_headline(payload)
    harness.print_json_line(payload)
    records.record_benchmark(payload)


def _save_random_base(variant: str, image_size: int, path: str) -> None:
    """A no-top base of random weights at `path`, loaded as a pretrained one would be."""
    from effpipe import variants
    from effpipe.model import efficientnet

    size = image_size or variants.VARIANTS[variant].native_image_size
    efficientnet.make_base(variant, size, "none").save_weights(path)


def _read_run(workdir: str, steps: int, wall_seconds: float) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as file:
        metrics = json.load(file)
    with open(os.path.join(workdir, "history.json")) as file:
        history = json.load(file)
    export_dir = os.path.join(workdir, "export")
    export_bytes = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(export_dir)
        for name in names
    )
    return {
        "benchmark": "headline_run",
        "device": metrics["device"],
        "variant": metrics["variant"],
        "image_size": metrics["image_size"],
        "batch_size": metrics["batch_size"],
        "precision": metrics["precision"],
        "xla": metrics["xla"],
        "steps_per_phase": steps,
        "steps_per_execution": metrics["steps_per_execution"],
        "startup_seconds": metrics["startup_seconds"],
        "first_step_seconds": metrics["first_step_seconds"],
        "images_per_sec": {
            phase: history[phase][-1]["images_per_sec"] for phase in ("phase1", "phase2")
        },
        "export_mb": round(export_bytes / 2**20, 1),
        "wall_seconds": round(wall_seconds, 1),
    }


if __name__ == "__main__":
    harness.run_main(PROGRAM, main)
