"""Random affine augmentation fused with the resize to the model resolution.

One bilinear sampling pass takes a uint8 source batch (e.g. 32x32) straight to the
model resolution (e.g. 456x456) under a per-image random affine transform
(rotation, shift, shear, independent x/y zoom, horizontal flip). It is written with
gathers so it compiles under XLA (`ImageProjectiveTransformV3`, behind Keras'
RandomRotation/RandomZoom/RandomTranslation, has no XLA kernel), and it replaces two
interpolations (augment at source size, then resize) with one.

Conventions, chosen to match Keras' ImageDataGenerator (what the original notebook
defined) and `tf.image.resize`:
  - Output pixel (row, col) first maps to source coordinates with half-pixel
    centres, `(i + 0.5) * source / output - 0.5`, as `tf.image.resize` does; the
    identity transform is therefore exactly a bilinear resize.
  - The transform is ImageDataGenerator's sampling matrix (output -> input, about
    the image centre): rotation @ shift @ shear @ zoom, which ImageDataGenerator
    applies in (col, row) order. So a positive angle turns the content
    counterclockwise, the shear slants columns, and shifts are fractions of the
    width (cols) and height (rows). Row and column zoom are drawn independently
    from [1 - zoom, 1 + zoom]. The flip mirrors the transformed image, as
    ImageDataGenerator flips after transforming.
  - Fill modes for samples outside the source: nearest (repeat the edge pixel, the
    default), reflect (half-sample symmetric, d c b a | a b c d | d c b a) and
    constant (0, interpolated at the border).

`AugmentResize` is the Keras layer that puts the operation inside the model, so it
runs in the compiled train step on the device, after the uint8 batch has crossed
the bus; evaluation takes the same layer's identity path, a plain bilinear resize.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from effpipe.config import FILL_MODES

# Named rather than "auto_select", so the draws do not depend on a device's choice.
# XLA's kernels still draw other values than TensorFlow's for the same key: a run is
# reproducible within one --xla setting.
RNG_ALGORITHM = "philox"

# Parameters drawn per image, in this order, each from its own RNG stream.
PARAMETER_NAMES = (
    "rotation_degrees",
    "shift_rows",
    "shift_cols",
    "shear_degrees",
    "zoom_rows",
    "zoom_cols",
    "flip",
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transform (all zero/False: the identity).

    Attributes:
      rotation_degrees: rotation drawn uniformly from [-r, r] degrees.
      shift_fraction: shifts drawn from [-s, s] times the height and width.
      shear_degrees: shear angle drawn from [-s, s] degrees.
      zoom_fraction: row and column zoom drawn independently from [1 - z, 1 + z].
      horizontal_flip: mirror half of the images left-right.
      fill_mode: "nearest", "reflect" or "constant" (0) outside the source.
    """

    rotation_degrees: float = 0.0
    shift_fraction: float = 0.0
    shear_degrees: float = 0.0
    zoom_fraction: float = 0.0
    horizontal_flip: bool = False
    fill_mode: str = "nearest"

    def __post_init__(self):
        if self.fill_mode not in FILL_MODES:
            raise ValueError(
                f"unknown fill_mode {self.fill_mode!r}: choose one of {', '.join(FILL_MODES)}"
            )
        for name in ("rotation_degrees", "shift_fraction", "shear_degrees", "zoom_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        if self.zoom_fraction >= 1:
            raise ValueError(f"zoom_fraction={self.zoom_fraction} must be below 1")


def make_key(seed: int, step, replica) -> tf.Tensor:
    """The stateless RNG key of one (seed, step, replica): a shape [2] int32 tensor.

    Counter-based: the same triple always gives the same draws, and replicas of one
    step draw different ones.
    """
    key = tf.constant([seed, 0], dtype=tf.int32)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int32), alg=RNG_ALGORITHM)
    return tf.random.experimental.stateless_fold_in(
        key, tf.cast(replica, tf.int32), alg=RNG_ALGORITHM
    )


def sample_parameters(key: tf.Tensor, batch_size: int, config: AugmentConfig) -> dict:
    """Draws one transform per image from a stateless key.

    Args:
      key: shape [2] integer key (see `make_key`).
      batch_size: images in the batch.
      config: the ranges.

    Returns:
      {name: float32 tensor [batch_size]} for every name in PARAMETER_NAMES; "flip"
      is 1.0 for mirrored images and 0.0 otherwise.
    """
    keys = tf.random.experimental.stateless_split(key, num=len(PARAMETER_NAMES), alg=RNG_ALGORITHM)

    def uniform(index, low, high):
        return tf.random.stateless_uniform(
            [batch_size],
            seed=keys[index],
            minval=low,
            maxval=high,
            dtype=tf.float32,
            alg=RNG_ALGORITHM,
        )

    rotation, shift, shear, zoom = (
        config.rotation_degrees,
        config.shift_fraction,
        config.shear_degrees,
        config.zoom_fraction,
    )
    flip_draw = uniform(6, 0.0, 1.0)
    return {
        "rotation_degrees": uniform(0, -rotation, rotation),
        "shift_rows": uniform(1, -shift, shift),
        "shift_cols": uniform(2, -shift, shift),
        "shear_degrees": uniform(3, -shear, shear),
        "zoom_rows": uniform(4, 1.0 - zoom, 1.0 + zoom),
        "zoom_cols": uniform(5, 1.0 - zoom, 1.0 + zoom),
        "flip": tf.cast(flip_draw < 0.5, tf.float32)
        if config.horizontal_flip
        else tf.zeros([batch_size]),
    }


def identity_parameters(batch_size: int) -> dict:
    """Parameters of the identity transform (evaluation): a plain bilinear resize."""
    zeros, ones = tf.zeros([batch_size]), tf.ones([batch_size])
    return {
        "rotation_degrees": zeros,
        "shift_rows": zeros,
        "shift_cols": zeros,
        "shear_degrees": zeros,
        "zoom_rows": ones,
        "zoom_cols": ones,
        "flip": zeros,
    }


def sampling_matrices(parameters: dict, source_height: int, source_width: int) -> tf.Tensor:
    """ImageDataGenerator's output -> input matrices about the centre: [B, 3, 3].

    They act on (col, row, 1) pixel coordinates, pixel centres at integers.
    """
    theta = parameters["rotation_degrees"] * (math.pi / 180.0)
    shear = parameters["shear_degrees"] * (math.pi / 180.0)
    shift_cols = parameters["shift_cols"] * source_width
    shift_rows = parameters["shift_rows"] * source_height
    zeros, ones = tf.zeros_like(theta), tf.ones_like(theta)

    def matrix(rows):
        return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)

    last_row = [zeros, zeros, ones]
    rotation = matrix(
        [[tf.cos(theta), -tf.sin(theta), zeros], [tf.sin(theta), tf.cos(theta), zeros], last_row]
    )
    shift = matrix([[ones, zeros, shift_cols], [zeros, ones, shift_rows], last_row])
    shear_matrix = matrix([[ones, -tf.sin(shear), zeros], [zeros, tf.cos(shear), zeros], last_row])
    zoom = matrix(
        [[parameters["zoom_cols"], zeros, zeros], [zeros, parameters["zoom_rows"], zeros], last_row]
    )
    transform = rotation @ shift @ shear_matrix @ zoom
    center_col, center_row = source_width / 2 - 0.5, source_height / 2 - 0.5
    to_center = tf.constant([[1, 0, center_col], [0, 1, center_row], [0, 0, 1]], tf.float32)
    from_center = tf.constant([[1, 0, -center_col], [0, 1, -center_row], [0, 0, 1]], tf.float32)
    return to_center @ transform @ from_center


def affine_resize(
    images: tf.Tensor,
    parameters: dict,
    output_size: tuple[int, int],
    fill_mode: str = "nearest",
    dtype=tf.float32,
) -> tf.Tensor:
    """Samples each image under its transform directly at `output_size`, bilinearly.

    Args:
      images: [B, H, W, C] source images, any real or integer dtype (uint8 usually).
      parameters: per-image transform parameters (see `sample_parameters`).
      output_size: (height, width) of the result in pixels.
      fill_mode: "nearest", "reflect" or "constant".
      dtype: dtype of the result (the compute dtype under mixed precision); the
        sampling itself runs in float32.

    Returns:
      [B, output_height, output_width, C] images on the 0..255 scale.
    """
    if fill_mode not in FILL_MODES:
        raise ValueError(f"unknown fill_mode {fill_mode!r}: choose one of {', '.join(FILL_MODES)}")
    batch_size = tf.shape(images)[0]
    source_height, source_width, channels = images.shape[1], images.shape[2], images.shape[3]
    output_height, output_width = output_size

    # Output pixel centres in source coordinates (tf.image.resize's half-pixel rule).
    rows = (tf.range(output_height, dtype=tf.float32) + 0.5) * (source_height / output_height) - 0.5
    cols = (tf.range(output_width, dtype=tf.float32) + 0.5) * (source_width / output_width) - 0.5
    grid_rows, grid_cols = tf.meshgrid(rows, cols, indexing="ij")
    grid_rows = tf.reshape(grid_rows, [1, -1])
    grid_cols = tf.reshape(grid_cols, [1, -1])
    # ImageDataGenerator flips after transforming: mirror the output grid.
    flip = parameters["flip"][:, None]
    grid_cols = flip * (source_width - 1 - grid_cols) + (1 - flip) * grid_cols

    matrices = sampling_matrices(parameters, source_height, source_width)
    source_cols = (
        matrices[:, 0, 0, None] * grid_cols
        + matrices[:, 0, 1, None] * grid_rows
        + matrices[:, 0, 2, None]
    )
    source_rows = (
        matrices[:, 1, 0, None] * grid_cols
        + matrices[:, 1, 1, None] * grid_rows
        + matrices[:, 1, 2, None]
    )

    flat_images = tf.reshape(tf.cast(images, tf.float32), [batch_size, -1, channels])
    row_floor, col_floor = tf.floor(source_rows), tf.floor(source_cols)
    row_weight = (source_rows - row_floor)[..., None]
    col_weight = (source_cols - col_floor)[..., None]
    row_floor, col_floor = tf.cast(row_floor, tf.int32), tf.cast(col_floor, tf.int32)

    def tap(row_offset, col_offset):
        row_index, row_inside = _fill_index(row_floor + row_offset, source_height, fill_mode)
        col_index, col_inside = _fill_index(col_floor + col_offset, source_width, fill_mode)
        values = tf.gather(flat_images, row_index * source_width + col_index, batch_dims=1)
        if fill_mode == "constant":
            values *= tf.cast(row_inside & col_inside, tf.float32)[..., None]
        return values

    top = tap(0, 0) * (1 - col_weight) + tap(0, 1) * col_weight
    bottom = tap(1, 0) * (1 - col_weight) + tap(1, 1) * col_weight
    sampled = top * (1 - row_weight) + bottom * row_weight
    sampled = tf.reshape(sampled, [batch_size, output_height, output_width, channels])
    return tf.cast(sampled, dtype)


def _fill_index(index: tf.Tensor, size: int, fill_mode: str):
    """Maps integer tap indices into [0, size) by the fill mode; also says which were inside."""
    inside = (index >= 0) & (index < size)
    if fill_mode == "reflect":
        # Half-sample symmetric: period 2 * size, mirrored in its second half.
        period = tf.math.floormod(index, 2 * size)
        return tf.where(period < size, period, 2 * size - 1 - period), inside
    return tf.clip_by_value(index, 0, size - 1), inside


@keras.saving.register_keras_serializable(package="effpipe")
class AugmentResize(keras.layers.Layer):
    """uint8 source images in, the model resolution out: augmented when training.

    Training calls (`training=True`) draw one transform per image from the stateless
    key (seed, step, replica) and advance the layer's step counter; every other
    call uses the identity transform, a plain bilinear resize. The output is in the
    layer's compute dtype (bfloat16 or float16 under mixed precision), on the
    0..255 scale the Keras EfficientNets take.

    The step counter is a non-trainable int64 weight: it is saved with the model's
    weights, so a restored model goes on drawing new transforms, and under a
    distribution strategy every replica reads the same value (only the first
    replica's update is kept) while the replica id makes their draws differ.

    Args:
      image_size: side of the square output in pixels.
      augment: the ranges of the random transform, or None for no augmentation.
      seed: the run's seed, first part of every key.
      compile_sampling: run the sampling as its own XLA computation (see
        `_compiled_affine_resize`); False only where XLA cannot run, such as under
        TensorFlow's numeric checks (--debug_numerics).
    """

    def __init__(
        self,
        image_size: int,
        augment: AugmentConfig | dict | None = None,
        seed: int = 0,
        compile_sampling: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(augment, dict):
            augment = AugmentConfig(**augment)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.compile_sampling = compile_sampling
        self.step = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="augment_step",
        )

    def call(self, images, training=None):
        batch_size = tf.shape(images)[0]
        if training and self.augment is not None:
            key = make_key(self.seed, self.step.value, _replica_id())
            parameters = sample_parameters(key, batch_size, self.augment)
            self.step.assign_add(1)
            fill_mode = self.augment.fill_mode
        else:
            parameters, fill_mode = identity_parameters(batch_size), "nearest"
        resample = _compiled_affine_resize if self.compile_sampling else affine_resize
        return resample(
            images,
            parameters,
            (self.image_size, self.image_size),
            fill_mode=fill_mode,
            dtype=self.compute_dtype,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, input_shape[-1])

    def get_config(self):
        augment = dataclasses.asdict(self.augment) if self.augment is not None else None
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "augment": augment,
            "seed": self.seed,
            "compile_sampling": self.compile_sampling,
        }


def draw(layer: AugmentResize, images) -> np.ndarray:
    """The train step's view of uint8 `images`: `layer` in training mode, float32 0..255.

    Each image draws its own transform, as in a training batch. The layer's step
    counter is put back afterwards, so training's own draws are unchanged (for the
    plots and TensorBoard images of a run).
    """
    step = layer.step.numpy()
    try:
        views = layer(images, training=True)
    finally:
        layer.step.assign(step)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(views, "float32")))


# The layer always runs the sampling as one XLA computation, even in a step that is
# not compiled (--xla=off, or CPU's default): unfused, its dozen [B, H, W, C]
# elementwise passes and four gathers were 9-13x slower on CPU (fused_uncompiled in
# benchmarks.augment_throughput). Inside an XLA-compiled step it is simply inlined.
_compiled_affine_resize = tf.function(affine_resize, jit_compile=True)


def _replica_id():
    """This replica's index in its sync group: 0 outside a distribution strategy."""
    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group
