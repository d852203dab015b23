"""Encoded image bytes to uint8 RGB at the storage size, inside tf.data.

A JPEG is decoded at 1/2, 1/4 or 1/8 scale when that leaves `size` pixels on the kept
region's shorter side: libjpeg skips most of its work, and averaging blocks antialiases.
The resize is antialiased only past MAX_PLAIN_SHRINK: below it plain bilinear (Keras'
image_dataset_from_directory's) loses little, and antialiasing costs more than the decode.
"""

import tensorflow as tf

# The scaled sizes libjpeg decodes at: 1/1, 1/2, 1/4 and 1/8 of each side.
DCT_RATIOS = (1, 2, 4, 8)
# The largest shrink of a side that a plain (not antialiased) bilinear resize does.
MAX_PLAIN_SHRINK = 3
# What a decoded image depends on besides TensorFlow's version: a decoded cache made
# under other values is decoded again (effpipe.data.cache). Bump "version" whenever
# this module changes the pixels it gives.
DECODER = {"version": 1, "dct_ratios": list(DCT_RATIOS), "max_plain_shrink": MAX_PLAIN_SHRINK}


def crop_window(height: tf.Tensor, width: tf.Tensor, crop: str) -> tf.Tensor:
    """[y, x, height, width] of the region kept: "resize" keeps the whole image (squeezed
    to a square later), "centre" the centred square of side min(height, width)."""
    if crop == "centre":
        side = tf.minimum(height, width)
        return tf.stack([(height - side) // 2, (width - side) // 2, side, side])
    return tf.stack([0, 0, height, width])


def decode_to_size(contents: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Decodes one file's bytes (JPEG, PNG, GIF, BMP) to (size, size, 3) uint8 RGB.

    Raises:
      tf.errors.InvalidArgumentError: when the op runs, for bytes that are not a
        whole image (empty, truncated, another format).
    """
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: _decode_jpeg(contents, size, crop),
        lambda: _decode_other(contents, size, crop),
    )
    return tf.ensure_shape(image, (size, size, 3))


def _decode_jpeg(contents, size, crop):
    shape = tf.image.extract_jpeg_shape(contents)
    window = crop_window(shape[0], shape[1], crop)

    def decode_at(ratio):
        if crop == "resize":
            image = tf.io.decode_jpeg(contents, channels=3, ratio=ratio)
        else:
            # The window is in the scaled image's pixels (libjpeg crops after scaling).
            image = tf.image.decode_and_crop_jpeg(
                contents, window // ratio, channels=3, ratio=ratio
            )
        return tf.ensure_shape(image, (None, None, 3))

    # The branch index: how many of the ratios 2, 4, 8 leave at least `size` pixels.
    fits = tf.cast(tf.minimum(window[2], window[3]) >= size * tf.constant(DCT_RATIOS[1:]), tf.int32)
    branches = [lambda ratio=ratio: decode_at(ratio) for ratio in DCT_RATIOS]
    image = tf.switch_case(tf.reduce_sum(fits), branches)
    # The decode kept only the window: "resize" takes it whole, with no slice.
    return resize_to_size(image, size, crop="resize")


def _decode_other(contents, size, crop):
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    return resize_to_size(tf.ensure_shape(image, (None, None, 3)), size, crop)


def resize_to_size(images: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Images (H, W, C) or (N, H, W, C), uint8 or float, cropped, then resized to `size`
    px uint8. The exported model's serving signatures share it with the decoder, so a
    served image reaches the model as a training image did."""
    if crop != "resize":
        shape = tf.shape(images)
        y, x, height, width = tf.unstack(crop_window(shape[-3], shape[-2], crop))
        images = images[..., y : y + height, x : x + width, :]
    # uint8 needs no float32 copy: both resize kernels compute in float32 anyway.
    is_uint8 = images.dtype == tf.uint8
    images = images if is_uint8 else tf.cast(images, tf.float32)
    shape = tf.shape(images)
    # Bilinear shrinking by more than MAX_PLAIN_SHRINK skips most source pixels.
    resized = tf.cond(
        tf.maximum(shape[-3], shape[-2]) > MAX_PLAIN_SHRINK * size,
        lambda: tf.image.resize(images, (size, size), antialias=True),
        lambda: tf.image.resize(images, (size, size)),
    )
    # Resizing uint8 keeps rounded pixels in [0, 255] (the weights are >= 0 and sum to 1);
    # float pixels may lie outside it: saturate.
    return (tf.cast if is_uint8 else tf.saturate_cast)(tf.round(resized), tf.uint8)
