"""Encoded image bytes to uint8 RGB at the storage size, inside tf.data.

JPEGs take a DCT-scaled decode, with --source_crop=centre fused into it
(decode_and_crop_jpeg). Other files (PNG, GIF's first frame, BMP, any of these named
.jpg) take decode_image; grayscale, palette, RGBA and CMYK all become RGB. Then: crop,
resize to size x size, round to uint8.

A JPEG is decoded at 1/2, 1/4 or 1/8 of its size when that still leaves `size` pixels
on the kept region's shorter side: libjpeg then skips most of the inverse DCT, and
the scaled decode averages blocks, an antialiased downscale. The bilinear resize after
it is antialiased only when it shrinks a side by more than MAX_PLAIN_SHRINK: that
costs more than the decode itself, and below 3x plain bilinear sampling (what Keras'
image_dataset_from_directory always does) loses little.
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
    """[y, x, height, width] of the region of an image that is kept.

    Args:
      height, width: the image's size in pixels (int32 scalars).
      crop: "resize" keeps the whole image (squeezed to a square later); "centre"
        keeps the centred square of side min(height, width).
    """
    if crop == "centre":
        side = tf.minimum(height, width)
        return tf.stack([(height - side) // 2, (width - side) // 2, side, side])
    return tf.stack([0, 0, height, width])


def decode_to_size(contents: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Decodes one encoded image to (size, size, 3) uint8 RGB.

    Args:
      contents: scalar string, the file's bytes (JPEG, PNG, GIF, BMP).
      crop: "resize" or "centre" (`crop_window`).

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
    shorter_side = tf.minimum(window[2], window[3])

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
    fits = tf.cast(shorter_side >= size * tf.constant(DCT_RATIOS[1:]), tf.int32)
    branches = [lambda ratio=ratio: decode_at(ratio) for ratio in DCT_RATIOS]
    image = tf.switch_case(tf.reduce_sum(fits), branches)
    # The decode kept only the window: "resize" takes it whole, with no slice.
    return resize_to_size(image, size, crop="resize")


def _decode_other(contents, size, crop):
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    return resize_to_size(tf.ensure_shape(image, (None, None, 3)), size, crop)


def resize_to_size(images: tf.Tensor, size: int, crop: str) -> tf.Tensor:
    """Decoded images (or one image) of any size to `size` px uint8, cropped first.

    The decoder above and the exported model's serving signatures share it, so a
    served image reaches the model as a training image did.

    Args:
      images: (H, W, C) or (N, H, W, C) uint8 or float.
      crop: "resize" or "centre" (`crop_window`).
    """
    if crop != "resize":
        shape = tf.shape(images)
        window = crop_window(shape[-3], shape[-2], crop)
        images = images[
            ..., window[0] : window[0] + window[2], window[1] : window[1] + window[3], :
        ]
    if images.dtype != tf.uint8:
        # Float pixels may lie outside [0, 255]: saturate.
        return tf.saturate_cast(tf.round(_resize(tf.cast(images, tf.float32), size)), tf.uint8)
    # uint8 needs no float32 copy: both resize kernels compute in float32 anyway. Their
    # weights are >= 0 and sum to 1, so the rounded pixels are already in [0, 255].
    return tf.cast(tf.round(_resize(images, size)), tf.uint8)


def _resize(images, size):
    # Bilinear shrinking by more than MAX_PLAIN_SHRINK skips most source pixels.
    shape = tf.shape(images)
    shrinks_much = tf.maximum(shape[-3], shape[-2]) > MAX_PLAIN_SHRINK * size
    return tf.cond(
        shrinks_much,
        lambda: tf.image.resize(images, (size, size), antialias=True),
        lambda: tf.image.resize(images, (size, size)),
    )
