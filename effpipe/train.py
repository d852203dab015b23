"""Trains an EfficientNet with the two-phase transfer-learning recipe.

    python -m effpipe.train --variant=b5 --mixed_precision --workdir=runs/b5
    python -m effpipe.train --flagfile=flags/b5_rtx3070.flags --workdir=runs/b5
    python -m effpipe.train --flagfile=flags/demo.flags --workdir=runs/demo
    python -m effpipe.train --flagfile=flags/demo.flags --workdir=runs/demo --print_config
    TF_CONFIG='{...}' python -m effpipe.train --strategy=multi_worker ...  # each machine

--helpshort lists the flags by section; --print_config prints the configuration as
this machine resolves it, by section, and exits without training or writing anything.

--require_gpu stops in one line, before anything is written, when TensorFlow sees no
GPU. Writes config.json, flags.txt, history.json, metrics.json, history.png, the best
checkpoint and the resume state to --workdir. Bad input ends with one line on
stderr and exit status 2. SIGINT or SIGTERM stops after the current step with one
line saying how to resume (exit status 130 or 143); rerunning the same command
resumes from the last completed epoch, after any interruption, SIGKILL included. In
a multi-worker run, a worker that stops makes the others stop within seconds with
one line and exit status 1; restarting every worker with the same command resumes.
"""

import os
import sys

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) would bury the log;
# warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags

from effpipe import (
    cli_flags,
    run_dir,
)
from effpipe.errors import TrainingInterrupted, UsageError, WorkerLost
from effpipe.training import cluster

PROGRAM = "effpipe.train"

flags.adopt_module_key_flags(cli_flags)
WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory for every output of the run. Rerunning with the same flags resumes "
    "an interrupted run there; other flags are refused unless --overwrite.",
)
flags.mark_flag_as_required("workdir")
OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Discard the outputs of a run with other flags in --workdir and start afresh.",
)
PRINT_CONFIG = flags.DEFINE_bool(
    "print_config",
    False,
    "Print the configuration by section with what this machine resolves from it "
    "(image and source size, precision, XLA, steps per call, batch per replica, "
    "cache), and exit without training or writing anything.",
)
REQUIRE_GPU = flags.DEFINE_bool(
    "require_gpu",
    False,
    "Stop with one line, before anything is written, unless TensorFlow computes on a "
    "GPU (without it a GPU that TensorFlow cannot use is a warning and the run goes "
    "on on the CPU).",
)


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    try:
        config = cli_flags.config_from_flags()
        if REQUIRE_GPU.value:
            # Loads TensorFlow before the run directory is touched.
            from effpipe.training import runtime

            runtime.require_gpu()
        if PRINT_CONFIG.value:
            # Loads TensorFlow to see the devices, but no data and no model.
            from effpipe.training import resolved_config

            print(resolved_config.describe(config, WORKDIR.value), end="")
            return
        # In a multi-worker run (TF_CONFIG) the chief alone prepares --workdir and
        # writes the run's files; the other workers only read it and write their own
        # files to a temporary folder of their own. The chief holds the directory's
        # lock before it writes anything.
        if cluster.current_task(config.distribution.strategy).is_chief:
            run_dir.hold(WORKDIR.value)
            status = run_dir.prepare(WORKDIR.value, config, overwrite=OVERWRITE.value)
        else:
            complete = run_dir.is_complete(WORKDIR.value, config)
            status = run_dir.COMPLETE if complete else run_dir.RESUME
        if status == run_dir.COMPLETE:
            print(
                f"{PROGRAM}: {WORKDIR.value} already holds this run, finished (metrics.json); "
                "pass --overwrite to train it again"
            )
            return
        # Imported here so that a bad flag fails before TensorFlow loads.
        from effpipe.training import trainer

        if cluster.current_task(config.distribution.strategy).is_chief:
            run_dir.write_text(
                os.path.join(WORKDIR.value, "flags.txt"),
                cli_flags.flagfile_text(PROGRAM, extra_flag_names=("workdir",)),
            )
        trainer.train_and_evaluate(config, workdir=WORKDIR.value)
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    except TrainingInterrupted as interruption:
        print(f"{PROGRAM}: {interruption}", file=sys.stderr)
        sys.exit(128 + interruption.signal_number)
    except WorkerLost as error:
        # Not the user's input (2): a scheduler that restarts failed jobs restarts it.
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
