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

from effpipe import augment, input_pipeline, plots
from effpipe.data_sources import Split

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

    Batches of `batch_size` in order, as the evaluate binary feeds the export.
    """
    dataset = input_pipeline.make_dataset(
        split.images, split.labels, batch_size=batch_size, is_training=False, seed=0
    )
    return np.asarray(
        model.predict(
            dataset.map(lambda images, labels: images), verbose=0, callbacks=list(callbacks)
        ),
        dtype=np.float32,
    )


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
        split.images[chosen],
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
