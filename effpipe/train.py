"""Trains an EfficientNet with the two-phase transfer-learning recipe.

    python -m effpipe.train --variant=b5 --mixed_precision --workdir=runs/b5
    python -m effpipe.train --flagfile=flags/b5_rtx3070.flags --workdir=runs/b5
    python -m effpipe.train --flagfile=flags/demo.flags --workdir=runs/demo

Writes flags.txt, history.json, metrics.json, history.png and the best checkpoint
to --workdir. Bad input ends with one line on stderr and exit status 2.
"""

import os

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) would bury the log;
# warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402

from effpipe import cli_flags, run_files  # noqa: E402
from effpipe.errors import UsageError  # noqa: E402

PROGRAM = "effpipe.train"

flags.adopt_module_key_flags(cli_flags)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for every output of the run.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        cli_flags.exit_with_usage_error(
            PROGRAM,
            UsageError(f"unexpected arguments {' '.join(argv[1:])}: flags take --name=value"),
        )
    try:
        config = cli_flags.config_from_flags()
        # Imported here so that a bad flag fails before TensorFlow loads.
        from effpipe import train_lib

        run_files.write_text(
            os.path.join(WORKDIR.value, "flags.txt"),
            cli_flags.flagfile_text(PROGRAM, extra_flag_names=("workdir",)),
        )
        train_lib.train_and_evaluate(config, workdir=WORKDIR.value)
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
