"""Re-evaluates a finished run's exported model on a dataset.

    python -m effpipe.evaluate --model=runs/demo
    python -m effpipe.evaluate --model=runs/b5 --dataset=folder:/data/photos

Uses the run's config.json for everything but the data flags given on the command
line (--dataset, --data_dir, --source_size, --source_crop, --cache*, --shapes_*, --on_bad_image,
--batch_size), and the run's export/ (the model the trainer evaluated, with its
preprocessing: images of any size are brought to the run's source size). Evaluates
the dataset's test split (its validation split, chosen as the trainer chose it,
when it has no test split) and writes to --output_dir (default WORKDIR/evaluation/):

    evaluation.json    top1, top5, per-class accuracy, the ten worst classes
    predictions.png    a grid of evaluated images with their top-5 classes
    per_class.png      the ten classes with the lowest accuracy

and prints the top-1 and top-5 line. Bad input: one line on stderr, exit status 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from effpipe import (
    cli_flags,
    run_dir,
)
from effpipe.config import FIELD_SLICES, TrainConfig
from effpipe.errors import UsageError

PROGRAM = "effpipe.evaluate"

flags.adopt_module_key_flags(cli_flags)
MODEL = flags.DEFINE_string("model", None, "The run directory of a finished run.", required=True)
OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where evaluation.json and the plots go (default WORKDIR/evaluation)."
)
# The flags that may differ from the run's: where the data comes from, and how much
# of it goes through the model at once.
DATA_FLAGS = (
    "dataset",
    "data_dir",
    "source_size",
    "source_crop",
    "cache",
    "cache_dir",
    "cache_memory_mb",
    "shapes_num_classes",
    "shapes_train_examples",
    "shapes_test_examples",
    "on_bad_image",
    "batch_size",
)


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    try:
        config = _run_config(MODEL.value)
        output_dir = OUTPUT_DIR.value or os.path.join(MODEL.value, "evaluation")
        # Imported here so that a bad flag fails before TensorFlow loads.
        from effpipe.outputs import evaluation

        summary = evaluation.evaluate_export(
            config.data,
            MODEL.value,
            output_dir,
            size=config.source_size,
            batch_size=config.batch_size,
            seed=config.seed,
        )
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    print(
        f"{summary['evaluated_on']} of {summary['dataset']}: top-1 {summary['top1']:.4f}, "
        f"top-5 {summary['top5']:.4f} on {summary['examples']} images; "
        f"outputs in {output_dir}",
        file=sys.stdout,
    )


def _run_config(workdir: str) -> TrainConfig:
    """The run's TrainConfig, with the data flags given on the command line."""
    path = os.path.join(workdir, run_dir.CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(workdir, "metrics.json")):
        raise UsageError(
            f"{workdir} is not a finished run (no {run_dir.CONFIG_FILE} and metrics.json): "
            "point --model at the --workdir of a run that completed"
        )
    recorded = run_dir.read_json(path)
    known = set(FIELD_SLICES)
    config = TrainConfig.from_flat(**{k: v for k, v in recorded.items() if k in known})
    given = {name: flags.FLAGS[name].value for name in DATA_FLAGS if flags.FLAGS[name].present}
    if given:
        logging.info("data flags from the command line: %s", given)
    return config.replace(**given)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
