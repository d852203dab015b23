"""Evaluating a finished run's export on a dataset (the work of `effpipe.evaluate`)."""

import os

import numpy as np
import tensorflow as tf

from effpipe import data_sources, evaluation, export, run_files
from effpipe.config import TrainConfig
from effpipe.errors import UsageError


def evaluate_export(config: TrainConfig, workdir: str, output_dir: str) -> dict:
    """Evaluates WORKDIR/export on the config's dataset; writes the outputs.

    Args:
      config: the run's configuration, data flags possibly replaced.
      workdir: the run directory (its export/ is evaluated).
      output_dir: where evaluation.json and the plots go.

    Returns:
      The summary written to evaluation.json.

    Raises:
      UsageError: no export, or a dataset whose classes differ from the model's.
    """
    export_dir = os.path.join(workdir, export.EXPORT_DIR)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise UsageError(
            f"{workdir} has no {export.EXPORT_DIR}/ SavedModel: the run did not finish, or ran "
            "with --noexport; rerun its command with --export to write it"
        )
    exported = export.load(export_dir)
    model_names = [n.decode() for n in exported.signatures["class_names"]()["class_names"].numpy()]
    source = data_sources.load_configured_source(config)
    if len(source.class_names) != len(model_names):
        raise UsageError(
            f"{config.dataset} has {len(source.class_names)} classes and the model "
            f"{len(model_names)}: evaluate on data with the model's classes"
        )
    _, _, split, evaluated_on = data_sources.configured_splits(config, source)
    serve = exported.signatures["serve_images"]
    probabilities = np.concatenate(
        [
            serve(images=tf.constant(split.images[start : start + config.batch_size]))[
                "all_probabilities"
            ].numpy()
            for start in range(0, len(split), config.batch_size)
        ]
    )
    summary = evaluation.summarize(probabilities, split.labels, source.class_names)
    summary.update(
        evaluated_on=evaluated_on, dataset=source.name, examples=len(split), model=export_dir
    )
    os.makedirs(output_dir, exist_ok=True)
    evaluation.write_plots(
        output_dir, split, probabilities, summary, source.class_names, seed=config.seed
    )
    run_files.write_json(os.path.join(output_dir, "evaluation.json"), summary)
    return summary
