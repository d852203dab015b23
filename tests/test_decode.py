"""effpipe.data.decode: every kind of file a photo folder holds, to RGB at the storage size."""

import image_files
import numpy as np
import pytest
import tensorflow as tf
from matplotlib import cbook

from effpipe.data import decode


def _decode(path, size=16, crop="resize"):
    return decode.decode_to_size(tf.io.read_file(str(path)), size, crop).numpy()


def _top_half_mean(image):
    return image[: image.shape[0] // 2].reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize(
    "writer, tolerance",
    [
        (image_files.write_jpeg, 8),
        (image_files.write_progressive_jpeg, 8),
        (image_files.write_cmyk_jpeg, 8),
        (image_files.write_png_rgb, 0),
        (image_files.write_png_rgba, 0),
        (image_files.write_png_palette, 0),
        (image_files.write_gif, 0),
        (image_files.write_bmp, 0),
        (image_files.write_png_named_jpg, 0),
    ],
)
def test_colour_files_decode_to_their_rgb(tmp_path, writer, tolerance):
    path = writer(tmp_path / "picture.img", color=image_files.GREEN)
    image = _decode(path)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(_top_half_mean(image), image_files.GREEN, atol=tolerance + 1)
    # The ramp below runs dark to bright, left to right: not flipped, not sideways.
    assert image[-1, 0].mean() < image[-1, -1].mean()


@pytest.mark.parametrize(
    "writer", [image_files.write_grayscale_jpeg, image_files.write_png_grayscale]
)
def test_grayscale_files_become_three_equal_channels(tmp_path, writer):
    image = _decode(writer(tmp_path / "gray.img", color=image_files.GREEN)).astype(int)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 1], image[..., 2])
    assert abs(_top_half_mean(image)[0] - image_files.luma(image_files.GREEN)) <= 9


@pytest.mark.parametrize(
    "writer",
    [
        image_files.write_truncated_jpeg,
        image_files.write_empty_file,
        image_files.write_text_as_jpg,
    ],
)
def test_bad_files_raise_when_decoded(tmp_path, writer):
    path = writer(tmp_path / "bad.jpg")
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(path)


def test_centre_crop_keeps_the_middle_square(tmp_path):
    # A wide picture: red left third, green middle, blue right third.
    picture = np.zeros((30, 90, 3), np.uint8)
    picture[:, :30, 0] = picture[:, 30:60, 1] = picture[:, 60:, 2] = 255
    encoded = tf.io.encode_png(picture)
    centre = decode.decode_to_size(encoded, 10, "centre").numpy()
    np.testing.assert_array_equal(centre, np.broadcast_to([0, 255, 0], (10, 10, 3)))
    squeezed = decode.decode_to_size(encoded, 9, "resize").numpy()
    np.testing.assert_array_equal(squeezed[:, 0], np.broadcast_to([255, 0, 0], (9, 3)))
    np.testing.assert_array_equal(squeezed[:, -1], np.broadcast_to([0, 0, 255], (9, 3)))


@pytest.mark.parametrize("size, crop", [(224, "resize"), (100, "centre"), (48, "resize")])
def test_dct_scaled_jpeg_decode_matches_a_full_decode_and_antialiased_resize(size, crop):
    # A real photo (512x600): sizes 100 and 48 take the 1/2 and 1/8 DCT-scaled decodes.
    contents = tf.io.read_file(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    full = tf.io.decode_jpeg(contents, channels=3)
    if crop == "centre":
        offset = (600 - 512) // 2
        full = full[offset : offset + 512]
    reference = tf.cast(
        tf.round(tf.image.resize(full, (size, size), antialias=True)), tf.uint8
    ).numpy()
    decoded = decode.decode_to_size(contents, size, crop).numpy()
    assert decoded.shape == (size, size, 3)
    assert np.abs(decoded.astype(int) - reference).mean() < 4


def test_serving_resize_matches_the_decoder_for_decoded_images():
    picture = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    from_bytes = decode.decode_to_size(tf.io.encode_png(picture), 16, "centre")
    from_pixels = decode.resize_to_size(tf.constant(picture[None]), 16, "centre")[0]
    np.testing.assert_array_equal(from_bytes.numpy(), from_pixels.numpy())


@pytest.mark.parametrize("size", [30, 16])
def test_uint8_and_float_pixels_resize_alike(size):
    # 40x60 to 30 is a plain bilinear resize; to 16 (a 3.75x shrink) it is antialiased.
    picture = np.random.default_rng(0).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    from_uint8 = decode.resize_to_size(tf.constant(picture), size, "resize")
    from_float = decode.resize_to_size(tf.constant(picture, tf.float32), size, "resize")
    np.testing.assert_array_equal(from_uint8.numpy(), from_float.numpy())


@pytest.mark.parametrize("dtype", [tf.uint8, tf.float32])
def test_halves_round_to_even_and_float_pixels_saturate(dtype):
    # A 2x2 picture resizes to its mean: 2.5, 3.5 and 0.5 round to even (tf.round).
    picture = np.array([[[2, 3, 0], [3, 4, 1]]] * 2)
    resized = decode.resize_to_size(tf.constant(picture, dtype), 1, "resize").numpy()
    np.testing.assert_array_equal(resized, [[[2, 4, 0]]])
    if dtype == tf.float32:
        beyond = decode.resize_to_size(tf.constant([[[-40.0, 300.0, 7.0]]]), 1, "resize")
        np.testing.assert_array_equal(beyond.numpy(), [[[0, 255, 7]]])
