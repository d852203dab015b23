"""A model's answers on a split, and the outputs people look at.

The trainer (after its final evaluation) and `effpipe.evaluate` share these:

    predictions.png    a grid of evaluated images with their top-5 classes
    per_class.png      the ten classes with the lowest accuracy
    augmentations.png  one training image under several draws of the train step's
                       augmentation (trainer only)

and the per-class figures that go into metrics.json (and evaluation.json).
"""

import os

import keras
import numpy as np
import tensorflow as tf

from effpipe import run_dir
from effpipe.config import DataConfig
from effpipe.data import pipeline, sources, splits
from effpipe.data.splits import Split
from effpipe.errors import UsageError
from effpipe.model import augment
from effpipe.outputs import export, plots

PREDICTIONS_PNG = "predictions.png"


PER_CLASS_PNG = "per_class.png"


AUGMENTATIONS_PNG = "augmentations.png"


# Classes listed by name in metrics.json as the worst.
WORST_CLASSES = 10


# Keras clips probabilities to [epsilon, 1 - epsilon] in its cross-entropy.
KERAS_EPSILON = 1e-7


# Images in predictions.png, drawn from the split with the run's seed.
PREDICTION_IMAGES = 16


def predict_probabilities(
    model: keras.Model, split: Split, batch_size: int, callbacks=()
) -> np.ndarray:
    """The model's class probabilities (N, num_classes) for a split, in its order.

    Batches of `batch_size` in order, as the evaluate binary feeds the export; the last
    one padded to a whole batch (its padding's answers dropped), so that the model's
    predict step is compiled for one shape.
    """
    dataset = pipeline.make_dataset(split, batch_size=batch_size, is_training=False, seed=0)

    def whole_batch(images, labels):
        padding = batch_size - tf.shape(images)[0]
        return tf.pad(images, [[0, padding], [0, 0], [0, 0], [0, 0]])

    probabilities = model.predict(dataset.map(whole_batch), verbose=0, callbacks=list(callbacks))
    return np.asarray(probabilities[: len(split)], dtype=np.float32)


def summarize(probabilities: np.ndarray, labels: np.ndarray, class_names, top_k: int = 5) -> dict:
    """Loss, top-1, top-k and per-class top-1 accuracy of a split's probabilities.

    Returns:
      {"loss" (mean cross-entropy, probabilities clipped to Keras' 1e-7), "top1",
      "top5", "per_class_accuracy": {name: accuracy}, "worst_classes":
      [{"class", "accuracy", "examples"}] (the WORST_CLASSES lowest)}. Classes with
      no example in the split are left out of the per-class figures.
    """
    labels = np.asarray(labels)
    top_k = min(top_k, probabilities.shape[1])
    # Ties broken by the lower class index, as argmax does.
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    top1_right = ranked[:, 0] == labels
    topk_right = (ranked == labels[:, None]).any(axis=1)
    per_class, counts = {}, {}
    for index, name in enumerate(class_names):
        members = labels == index
        if members.any():
            per_class[name] = float(top1_right[members].mean())
            counts[name] = int(members.sum())
    worst = sorted(per_class, key=lambda name: (per_class[name], name))[:WORST_CLASSES]
    label_probabilities = probabilities[np.arange(len(labels)), labels]
    loss = -np.log(np.clip(label_probabilities, KERAS_EPSILON, 1.0 - KERAS_EPSILON))
    return {
        "loss": float(loss.mean()),
        "top1": float(top1_right.mean()),
        "top5": float(topk_right.mean()),
        "per_class_accuracy": per_class,
        "worst_classes": [
            {"class": name, "accuracy": per_class[name], "examples": counts[name]} for name in worst
        ],
    }


def write_plots(
    folder: str, split: Split, probabilities: np.ndarray, summary: dict, class_names, seed: int
) -> None:
    """predictions.png (a seeded sample of the split) and per_class.png."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(split), min(PREDICTION_IMAGES, len(split)), replace=False))
    plots.plot_predictions(
        split.subset(chosen).load_images(),
        split.labels[chosen],
        probabilities[chosen],
        class_names,
        os.path.join(folder, PREDICTIONS_PNG),
    )
    plots.plot_per_class(
        summary["per_class_accuracy"], os.path.join(folder, PER_CLASS_PNG), WORST_CLASSES
    )


def write_augmentations(model: keras.Model, image: np.ndarray, path: str, count: int = 9) -> None:
    """augmentations.png: `image` and `count` draws of the train step's augmentation."""
    resize = model.get_layer("resize")
    note = None if resize.augment is not None else "augmentation off (--noaugment)"
    views = augment.draw(resize, np.repeat(image[None], count, axis=0))
    plots.plot_augmentations(image, views, path, note=note)


def evaluate_export(
    data: DataConfig, workdir: str, output_dir: str, *, size: int, batch_size: int, seed: int
) -> dict:
    """Evaluates WORKDIR/export on the config's dataset; writes the outputs.

    Args:
      data: the run's data slice, flags given on the command line replaced.
      workdir: the run directory (its export/ is evaluated).
      output_dir: where evaluation.json and the plots go.
      size: side in pixels the images are decoded to (the run's source size).
      batch_size: images per serving call.
      seed: the run's seed (its validation split, and the plots' choice of images).

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
    source = sources.load_configured_source(
        data, size=size, seed=seed, cache_root=run_dir.image_cache_root(workdir, data.cache_dir)
    )
    if len(source.class_names) != len(model_names):
        raise UsageError(
            f"{data.dataset} has {len(source.class_names)} classes and the model "
            f"{len(model_names)}: evaluate on data with the model's classes"
        )
    _, _, split, evaluated_on = splits.configured_splits(data, source, seed=seed)
    serve = exported.signatures["serve_images"]
    batches = pipeline.make_dataset(split, batch_size=batch_size, is_training=False)
    probabilities = np.concatenate(
        [serve(images=images)["all_probabilities"].numpy() for images, _ in batches]
    )
    summary = summarize(probabilities, split.labels, source.class_names)
    summary.update(
        evaluated_on=evaluated_on, dataset=source.name, examples=len(split), model=export_dir
    )
    os.makedirs(output_dir, exist_ok=True)
    write_plots(output_dir, split, probabilities, summary, source.class_names, seed=seed)
    run_dir.write_json(os.path.join(output_dir, "evaluation.json"), summary)
    return summary
