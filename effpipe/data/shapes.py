"""The synthetic shapes dataset: seeded, learnable, offline; the demo's and tests' data."""

import numpy as np

from effpipe.data.splits import DataSource, Split

# A class is a kind of shape, whatever its colour, size and position.
SHAPE_NAMES = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "horizontal_bar",
    "vertical_bar",
    "x_cross",
    "half_disc",
)


def make_shapes_source(
    *, num_classes: int, train_examples: int, test_examples: int, image_size: int, seed: int
) -> DataSource:
    """The synthetic shapes source: train and test drawn from independent seeds."""
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    return DataSource(
        "shapes",
        make_shapes(train_examples, num_classes, image_size, np.random.default_rng(train_seed)),
        make_shapes(test_examples, num_classes, image_size, np.random.default_rng(test_seed)),
        SHAPE_NAMES[:num_classes],
    )


def make_shapes(
    num_examples: int, num_classes: int, image_size: int, rng: np.random.Generator
) -> Split:
    """Draws balanced, labelled images: one shape of random centre, size and colour on
    a noisy background at least 80 levels away from it, so the shape is always visible.
    """
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    grid = np.arange(image_size, dtype=np.float32) + 0.5
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    for index, label in enumerate(labels):
        radius = rng.uniform(0.22, 0.36) * image_size
        center_row, center_col = rng.uniform(radius, image_size - radius, size=2)
        mask = _shape_mask(
            SHAPE_NAMES[label], (cols - center_col) / radius, (rows - center_row) / radius
        )
        background = rng.uniform(0, 255, size=3)
        foreground = rng.uniform(0, 255, size=3)
        while np.abs(foreground - background).max() < 80:
            foreground = rng.uniform(0, 255, size=3)
        image = np.where(mask[..., None], foreground, background)
        image = image + rng.normal(0, 8, size=image.shape)
        images[index] = np.clip(image, 0, 255).astype(np.uint8)
    return Split(images, labels)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in coordinates scaled by its radius (v points down)."""
    distance = np.sqrt(u * u + v * v)
    if kind == "circle":
        return distance <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":
        return (v <= 0.8) & (np.abs(u) <= 0.55 * (v + 0.9))
    if kind == "plus":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == "ring":
        return (distance <= 1.0) & (distance >= 0.55)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == "horizontal_bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)
    if kind == "vertical_bar":
        return (np.abs(v) <= 1.0) & (np.abs(u) <= 0.3)
    if kind == "x_cross":
        return ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (distance <= 1.0)
    if kind == "half_disc":
        return (distance <= 1.0) & (v >= -0.1)
    raise AssertionError(f"no mask for shape {kind}")
