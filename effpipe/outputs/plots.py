"""PNG plots of a run, drawn with matplotlib's headless Agg backend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from effpipe import run_dir


def plot_history(history: dict, path: str) -> None:
    """Draws loss and accuracy, train and validation, of both phases on one epoch axis.

    Args:
      history: {"phase1": [epoch records], "phase2": [...]}, each record holding
        loss, accuracy, val_loss and val_accuracy (the layout of history.json).
      path: where the PNG goes (written atomically).
    """
    epochs = history["phase1"] + history["phase2"]
    numbers = list(range(1, len(epochs) + 1))
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, metric, title in (
        (loss_axes, "loss", "loss"),
        (accuracy_axes, "accuracy", "top-1 accuracy"),
    ):
        axes.plot(numbers, [e[metric] for e in epochs], "o-", label=f"train {title}")
        axes.plot(numbers, [e[f"val_{metric}"] for e in epochs], "s--", label=f"validation {title}")
        if history["phase1"] and history["phase2"]:
            boundary = len(history["phase1"]) + 0.5
            axes.axvline(boundary, color="grey", linestyle=":")
            axes.text(
                boundary,
                0.98,
                " phase 2",
                transform=axes.get_xaxis_transform(),
                va="top",
                color="grey",
            )
        if len(numbers) <= 20:
            axes.set_xticks(numbers)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    run_dir.write_atomically(
        path, lambda temporary: figure.savefig(temporary, dpi=100, format="png")
    )
    plt.close(figure)


# The notebook's plot_image colours, one more step apart: top-1 right, right label
# in the top 5, wrong.
TOP1_COLOUR, TOPK_COLOUR, WRONG_COLOUR = "tab:blue", "tab:green", "tab:red"


def plot_predictions(images, labels, probabilities, class_names, path: str, top_k: int = 5):
    """A grid of images, each with its top-k classes and probabilities.

    The title is blue when the top-1 class is right, green when the right class is
    in the top k, red otherwise; the right class's bar is drawn in that colour.

    Args:
      images: (N, H, W, 3) uint8 images (up to 16 are drawn).
      labels: (N,) true class indices.
      probabilities: (N, num_classes) model outputs.
      class_names: one name per class.
      path: where the PNG goes (written atomically).
      top_k: classes listed per image.
    """
    import numpy as np

    count = min(len(images), 16)
    columns = 4
    rows = -(-count // columns)
    top_k = min(top_k, probabilities.shape[1])
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(4.2 * columns, 2.3 * rows))
    axes = np.atleast_2d(axes)
    for index in range(rows * columns):
        image_axes = axes[index // columns, 2 * (index % columns)]
        bars_axes = axes[index // columns, 2 * (index % columns) + 1]
        if index >= count:
            image_axes.axis("off")
            bars_axes.axis("off")
            continue
        order = np.argsort(-probabilities[index])[:top_k]
        label = int(labels[index])
        colour = (
            TOP1_COLOUR if order[0] == label else TOPK_COLOUR if label in order else WRONG_COLOUR
        )
        image_axes.imshow(images[index], interpolation="nearest")
        image_axes.set_xticks([])
        image_axes.set_yticks([])
        image_axes.set_title(f"true: {class_names[label]}", color=colour, fontsize=9)
        for side in image_axes.spines.values():
            side.set_edgecolor(colour)
            side.set_linewidth(3)
        positions = np.arange(top_k)[::-1]
        bar_colours = [colour if c == label else "lightgrey" for c in order]
        bars_axes.barh(positions, probabilities[index][order], color=bar_colours)
        for position, class_index in zip(positions, order):
            bars_axes.text(
                0.02,
                position,
                f"{class_names[class_index]} {probabilities[index][class_index]:.2f}",
                va="center",
                fontsize=8,
            )
        bars_axes.set_yticks([])
        bars_axes.set_xlim(0, 1)
        bars_axes.tick_params(axis="x", labelsize=7)
    figure.suptitle(
        f"top-{top_k} predictions: blue top-1 right, green right in the top {top_k}, red wrong"
    )
    figure.tight_layout()
    _save(figure, path)


def plot_augmentations(source_image, augmented, path: str, note: str | None = None) -> None:
    """One source image and the same image under several random augmentations.

    Args:
      source_image: (H, W, 3) uint8, as stored on the host.
      augmented: (N, S, S, 3) the train step's augmented inputs (0..255 floats).
      path: where the PNG goes (written atomically).
      note: added to the title (e.g. that augmentation is off).
    """
    import numpy as np

    count = len(augmented) + 1
    columns = min(count, 5)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows))
    axes = np.atleast_1d(axes).ravel()
    shown = [source_image, *np.clip(np.asarray(augmented, np.float32), 0, 255).astype(np.uint8)]
    for index, image_axes in enumerate(axes):
        image_axes.axis("off")
        if index < count:
            image_axes.imshow(shown[index], interpolation="nearest")
            if index == 0:
                image_axes.set_title(f"source {source_image.shape[0]} px", fontsize=9)
            else:
                image_axes.set_title(f"draw {index}, {shown[index].shape[0]} px", fontsize=9)
    title = "one training image as the train step sees it, several random draws"
    figure.suptitle(title + (f": {note}" if note else ""))
    _save(figure, path)


def plot_per_class(per_class_accuracy: dict, path: str, worst: int = 10) -> None:
    """Accuracy of the `worst` classes with the lowest accuracy, and of the best for scale.

    Args:
      per_class_accuracy: {class name: top-1 accuracy} (classes seen at least once).
      path: where the PNG goes (written atomically).
      worst: how many of the lowest classes to draw.
    """
    ranked = sorted(per_class_accuracy.items(), key=lambda item: (item[1], item[0]))
    shown = ranked[:worst]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.5))
    names = [name for name, _ in shown][::-1]
    values = [value for _, value in shown][::-1]
    axes.barh(names, values, color=WRONG_COLOUR)
    mean = sum(per_class_accuracy.values()) / max(len(per_class_accuracy), 1)
    axes.axvline(mean, color="grey", linestyle=":", label=f"mean over classes {mean:.3f}")
    axes.set_xlim(0, 1)
    axes.set_xlabel("top-1 accuracy")
    axes.set_title(f"the {len(shown)} classes with the lowest accuracy")
    axes.legend(loc="lower right")
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path: str) -> None:
    run_dir.write_atomically(
        path, lambda temporary: figure.savefig(temporary, dpi=100, format="png")
    )
    plt.close(figure)
