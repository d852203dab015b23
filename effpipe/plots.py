"""PNG plots of a run, drawn with matplotlib's headless Agg backend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from effpipe import run_files  # noqa: E402


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
    run_files.write_atomically(
        path, lambda temporary: figure.savefig(temporary, dpi=100, format="png")
    )
    plt.close(figure)
