"""The largest batch that trains inside a memory budget, per phase, and how fast.

    python -m effpipe.tune_batch --variant=b5 --memory_budget_gb=8
    python -m effpipe.tune_batch --variant=b5 --memory_budget_gb=8 --mixed_precision \\
        --phase=2 --unfreeze_blocks=4 --output=flags/tuned_b5_8gb.flags

Takes the trainer's model flags (variant, resolution, precision, head,
augmentation, --unfreeze_blocks, ...) and answers for phase 1 (base frozen),
phase 2 (top blocks unfrozen) or both:

- On a GPU (method `measured`): every trial runs in a fresh subprocess whose GPU
  is capped at the budget with a logical device (`memory_limit`), so an 8 GB card
  is emulated on a larger one. A trial builds the trainer's model, compiles the
  trainer's train step (augmentation, precision and XLA included) and runs
  --trial_steps steps twice; its peak is TensorFlow's allocator peak. The search
  doubles from the estimate's answer, then bisects.
- Without a GPU (method `estimated`): the analytical estimate of
  `effpipe.tune.memory`, from the real model's layer shapes and dtypes, and
  one CPU trial at --cpu_trial_batch whose peak RSS is printed as a sanity figure.
  `--method=measured` without a GPU runs the measured search on the CPU: each trial
  trains the real step uncapped and fits when its process's peak RSS stays within
  the budget (host memory, for CPU training; and the measured path testable here).

Prints a table of the trials, writes a flagfile that sets --batch_size only (the
smaller of the phases' batches; its header names the model it holds for), to add
after the recipe, and ends with one JSON line: phase1_max_batch,
phase2_max_batch, method, memory_budget_gb and the trials. The budget is the
card's memory; --reserved_mib of it is left to the CUDA context and libraries.
"""

import datetime
import json
import os
import shlex
import sys

# TensorFlow's C++ start-up chatter would bury the table; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from effpipe import cli_flags
from effpipe.errors import UsageError
from effpipe.tune import search

PROGRAM = "effpipe.tune_batch"

flags.adopt_module_key_flags(cli_flags)
MEMORY_BUDGET_GB = flags.DEFINE_float(
    "memory_budget_gb", 8.0, "Device memory of the card to fit, in GB (GiB), e.g. 8."
)
PHASE = flags.DEFINE_enum(
    "phase", "both", ["1", "2", "both"], "1: base frozen; 2: top blocks unfrozen; both."
)
OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Flagfile to write (default flags/tuned_<variant>_<budget>gb.flags); '' writes none.",
)
METHOD = flags.DEFINE_enum(
    "method",
    "auto",
    ["auto", "measured", "estimated"],
    "measured: real trials of the train step (on a GPU capped at the budget; without "
    "one, on the CPU, judged by each trial's peak RSS against the budget); estimated: "
    "the analytical estimate; auto: measured when a GPU is visible.",
)
MAX_BATCH = flags.DEFINE_integer("max_batch", 1024, "The search never tries a larger batch.")
RESOLUTION = flags.DEFINE_integer(
    "resolution",
    1,
    "Measured search: stop bisecting once the bracket is this narrow (1: the exact "
    "largest batch; 8 saves trials and answers at most 7 below it).",
)
RESERVED_MIB = flags.DEFINE_integer(
    "reserved_mib",
    1024,
    "MiB of the card outside TensorFlow's allocator (CUDA context, cuDNN, cuBLAS).",
)
TRIAL_STEPS = flags.DEFINE_integer(
    "trial_steps", 5, "Train steps a trial times, after as many warm-up steps."
)
TRIAL_TIMEOUT_S = flags.DEFINE_integer(
    "trial_timeout_s", 900, "Seconds before a trial that gave no answer is killed."
)
CPU_TRIAL_BATCH = flags.DEFINE_integer(
    "cpu_trial_batch",
    2,
    "Without a GPU: the batch of one CPU trial whose peak RSS is printed beside the "
    "estimate (0 skips it).",
)
# One trial in this process, for the search's subprocesses; not for direct use.
TRIAL_BATCH = flags.DEFINE_integer(
    "trial_batch", 0, "Internal: run one trial at this batch size and print its JSON."
)


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    try:
        config = cli_flags.config_from_flags()
        if MEMORY_BUDGET_GB.value <= 0 or MEMORY_BUDGET_GB.value > 1024:
            raise UsageError(
                f"--memory_budget_gb={MEMORY_BUDGET_GB.value:g} must be a card's memory "
                "in GB, above 0 (e.g. 8)"
            )
        usable = search.usable_budget_bytes(MEMORY_BUDGET_GB.value, RESERVED_MIB.value)
        if usable <= 0:
            raise UsageError(
                f"--reserved_mib={RESERVED_MIB.value} leaves nothing of "
                f"--memory_budget_gb={MEMORY_BUDGET_GB.value:g}: lower it"
            )
        for flag in (MAX_BATCH, TRIAL_STEPS, RESOLUTION):
            if flag.value < 1:
                raise UsageError(f"--{flag.name}={flag.value} must be at least 1")
        # Imported here so that a bad flag fails before TensorFlow loads.
        from effpipe.tune import tuner

        if TRIAL_BATCH.value:
            phase = 1 if PHASE.value == "both" else int(PHASE.value)
            trial = tuner.run_trial(
                config, phase, TRIAL_BATCH.value, usable, steps=TRIAL_STEPS.value
            )
            print(json.dumps(trial))
            return
        report = tuner.tune(
            config,
            phases=[1, 2] if PHASE.value == "both" else [int(PHASE.value)],
            usable_bytes=usable,
            method=METHOD.value,
            max_batch=MAX_BATCH.value,
            resolution=RESOLUTION.value,
            cpu_trial_batch=CPU_TRIAL_BATCH.value,
            trial_command=_trial_command,
            trial_flagfile_text=cli_flags.flagfile_text(
                PROGRAM, extra_flag_names=("memory_budget_gb", "reserved_mib", "trial_steps")
            ),
            trial_timeout_s=TRIAL_TIMEOUT_S.value,
        )
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    report["memory_budget_gb"] = MEMORY_BUDGET_GB.value
    tuner.print_report(report)
    output = OUTPUT.value
    if output is None:
        output = os.path.join(
            "flags", f"tuned_{config.model.variant}_{MEMORY_BUDGET_GB.value:g}gb.flags"
        )
    batch_size = _flagfile_batch(report)
    if output:
        if batch_size:
            _write_flagfile(output, report, batch_size, config)
            print(f"wrote {output}: --batch_size={batch_size}")
            report["flagfile"] = output
        else:
            print("no batch fits this budget: no flagfile written", file=sys.stderr)
    print(json.dumps(report))
    if not batch_size:
        sys.exit(1)


def _trial_command(batch_size: int, phase: int, flagfile: str) -> list[str]:
    """The subprocess that runs one trial with this run's flags (in `flagfile`)."""
    return [
        sys.executable,
        "-m",
        "effpipe.tune_batch",
        f"--flagfile={flagfile}",
        f"--trial_batch={batch_size}",
        f"--phase={phase}",
    ]


def _flagfile_batch(report: dict) -> int:
    """The trainer's --batch_size: one batch for both phases, so the smaller."""
    batches = [report[f"phase{phase}_max_batch"] for phase in report["phases"]]
    return min(batches)


def _write_flagfile(path: str, report: dict, batch_size: int, config) -> None:
    """A trainer flagfile that sets what was tuned, --batch_size, and nothing else:
    added after a recipe it must not change the recipe's model or data. Its header
    names the model the answer holds for."""
    from effpipe import run_dir

    command = shlex.join(["python", "-m", PROGRAM, *sys.argv[1:]])
    per_phase = ", ".join(
        f"phase {phase} max {report[f'phase{phase}_max_batch']}" for phase in report["phases"]
    )
    how = (
        (
            f"measured: trials of the real train step on {report['device']} capped at the budget"
            if report["device"] != "CPU"
            else "measured: trials of the real train step on the CPU, peak RSS against the budget"
        )
        if report["method"] == "measured"
        else "estimated: the analytical estimate of effpipe/tune/memory.py, no GPU measured"
    )
    model, runtime = config.model, config.runtime
    precision = "mixed precision" if runtime.mixed_precision else "float32"
    if runtime.mixed_precision_dtype != "auto":
        precision += f" {runtime.mixed_precision_dtype}"
    header = [
        f"# Batch size for a card of {MEMORY_BUDGET_GB.value:g} GB, tuned "
        f"{datetime.date.today().isoformat()} by:",
        f"#   {command}",
        f"# {how}; {per_phase}.",
        f"# It holds for {model.variant} at {model.resolved_image_size} px, {precision}, "
        f"XLA {runtime.xla}, the {model.head} head, augmentation "
        f"{'on' if config.augmentation.augment else 'off'} and {config.phases.unfreeze_blocks} "
        "blocks unfrozen in phase 2.",
        "# It sets --batch_size only: add it after your recipe (last value wins):",
        "#   python -m effpipe.train --flagfile=RECIPE --flagfile=THIS_FILE --workdir=DIR",
    ]
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    run_dir.write_text(path, "\n".join([*header, f"--batch_size={batch_size}"]) + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
