"""The fused random affine + resize: conventions, ranges, XLA, fill modes, RNG keys."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from effpipe.model import augment

RNG = np.random.default_rng(0)


def _images(batch=3, size=32):
    return RNG.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)


def _smooth_images(batch=2, size=32):
    """Low-frequency images: two interpolation passes barely differ on them."""
    coarse = RNG.uniform(0, 255, size=(batch, 5, 5, 3)).astype(np.float32)
    return tf.image.resize(coarse, (size, size), method="bicubic").numpy().clip(0, 255)


def _parameters(batch, **values):
    parameters = augment.identity_parameters(batch)
    for name, value in values.items():
        parameters[name] = tf.fill([batch], float(value))
    return parameters


@pytest.mark.parametrize("output_size", [(70, 70), (48, 40), (20, 20)])
def test_identity_equals_a_plain_bilinear_resize(output_size):
    images = _images()
    fused = augment.affine_resize(images, augment.identity_parameters(3), output_size)
    expected = tf.image.resize(tf.cast(images, tf.float32), output_size, method="bilinear")
    np.testing.assert_allclose(fused.numpy(), expected.numpy(), atol=1e-4)


def test_flip_only_equals_flipping_the_resize():
    images = _images()
    fused = augment.affine_resize(images, _parameters(3, flip=1), (64, 64))
    resized = tf.image.resize(tf.cast(images, tf.float32), (64, 64))
    np.testing.assert_allclose(fused.numpy(), tf.image.flip_left_right(resized), atol=1e-4)


def test_a_90_degree_rotation_equals_rot90_of_the_resize():
    images = _images()
    fused = augment.affine_resize(images, _parameters(3, rotation_degrees=90), (64, 64))
    resized = tf.image.resize(tf.cast(images, tf.float32), (64, 64))
    # ImageDataGenerator's positive angle turns the content counterclockwise.
    np.testing.assert_allclose(fused.numpy(), tf.image.rot90(resized, k=1), atol=1e-2)


def test_sampled_parameters_fill_their_ranges_and_never_leave_them():
    config = augment.AugmentConfig(
        rotation_degrees=40, shift_fraction=0.2, shear_degrees=10, zoom_fraction=0.2,
        horizontal_flip=True,
    )  # fmt: skip
    parameters = augment.sample_parameters(augment.make_key(0, 3, 0), 4096, config)
    ranges = {
        "rotation_degrees": (-40, 40),
        "shift_rows": (-0.2, 0.2),
        "shift_cols": (-0.2, 0.2),
        "shear_degrees": (-10, 10),
        "zoom_rows": (0.8, 1.2),
        "zoom_cols": (0.8, 1.2),
    }
    for name, (low, high) in ranges.items():
        values = parameters[name].numpy()
        assert values.min() >= low and values.max() <= high, name
        span = high - low
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span, name
    # Row and column zoom are drawn independently.
    assert abs(np.corrcoef(parameters["zoom_rows"], parameters["zoom_cols"])[0, 1]) < 0.1
    assert set(np.unique(parameters["flip"])) == {0.0, 1.0}
    assert 0.45 < parameters["flip"].numpy().mean() < 0.55


def test_disabled_ranges_draw_the_identity():
    parameters = augment.sample_parameters(augment.make_key(1, 0, 0), 64, augment.AugmentConfig())
    identity = augment.identity_parameters(64)
    for name in augment.PARAMETER_NAMES:
        np.testing.assert_array_equal(parameters[name], identity[name])


def test_the_same_key_draws_the_same_and_replicas_draw_differently():
    config = augment.AugmentConfig(rotation_degrees=40, horizontal_flip=True)

    def draw(seed, step, replica):
        return augment.sample_parameters(augment.make_key(seed, step, replica), 8, config)

    np.testing.assert_array_equal(
        draw(0, 5, 1)["rotation_degrees"], draw(0, 5, 1)["rotation_degrees"]
    )
    for other in (draw(0, 5, 0), draw(0, 6, 1), draw(1, 5, 1)):
        assert not np.allclose(other["rotation_degrees"], draw(0, 5, 1)["rotation_degrees"])


def test_xla_gives_the_same_output():
    config = augment.AugmentConfig(
        rotation_degrees=40, shift_fraction=0.2, shear_degrees=5, zoom_fraction=0.2,
        horizontal_flip=True, fill_mode="reflect",
    )  # fmt: skip
    images = tf.constant(_images(4))
    parameters = augment.sample_parameters(augment.make_key(7, 2, 0), 4, config)

    def run():
        return augment.affine_resize(images, parameters, (56, 56), fill_mode="reflect")

    np.testing.assert_allclose(
        run().numpy(), tf.function(run, jit_compile=True)().numpy(), atol=1e-2
    )


def test_draws_are_reproducible_under_xla():
    config = augment.AugmentConfig(rotation_degrees=40)

    @tf.function(jit_compile=True)
    def draw(step):
        return augment.sample_parameters(augment.make_key(7, step, 0), 4, config)

    first = draw(tf.constant(2))["rotation_degrees"].numpy()
    np.testing.assert_array_equal(first, draw(tf.constant(2))["rotation_degrees"].numpy())
    assert np.abs(first).max() <= 40
    assert not np.allclose(first, draw(tf.constant(3))["rotation_degrees"].numpy())


def test_a_train_step_with_augmentation_compiles_with_xla_on_cpu():
    config = augment.AugmentConfig(rotation_degrees=40, shift_fraction=0.2, horizontal_flip=True)
    kernel = tf.Variable(tf.random.normal([3, 3, 3, 4], stddev=0.1))
    images = tf.constant(_images(2, size=16))

    @tf.function(jit_compile=True)
    def step(step_number):
        parameters = augment.sample_parameters(augment.make_key(0, step_number, 0), 2, config)
        with tf.GradientTape() as tape:
            augmented = augment.affine_resize(images, parameters, (32, 32)) / 255.0
            features = tf.nn.conv2d(augmented, kernel, strides=1, padding="SAME")
            loss = tf.reduce_mean(tf.square(features))
        kernel.assign_sub(0.1 * tape.gradient(loss, kernel))
        return loss

    losses = [float(step(tf.constant(index))) for index in range(3)]
    assert all(np.isfinite(losses))


def test_output_dtype_follows_the_compute_dtype():
    images = _images(1)
    fused = augment.affine_resize(
        images, augment.identity_parameters(1), (40, 40), dtype=tf.bfloat16
    )
    assert fused.dtype == tf.bfloat16


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_fill_modes_outside_the_source(fill_mode):
    images = _images(1, size=16).astype(np.float32)
    # Shift the content half a width: the sampled columns 8..15 fall outside 0..15.
    shifted = augment.affine_resize(
        images, _parameters(1, shift_cols=0.5), (16, 16), fill_mode=fill_mode
    ).numpy()[0]
    np.testing.assert_allclose(shifted[:, :8], images[0][:, 8:], atol=1e-4)
    outside = shifted[:, 8:]
    if fill_mode == "constant":
        np.testing.assert_allclose(outside[:, 1:], 0.0)
    elif fill_mode == "nearest":
        np.testing.assert_allclose(outside, np.repeat(images[0][:, 15:16], 8, axis=1), atol=1e-4)
    else:  # reflect: column 16 mirrors 15, 17 mirrors 14, ...
        np.testing.assert_allclose(outside, images[0][:, 15:7:-1], atol=1e-4)


def test_unknown_fill_mode_is_refused():
    with pytest.raises(ValueError, match="fill_mode"):
        augment.AugmentConfig(fill_mode="wrap")


TRANSFORM = dict(
    rotation_degrees=20.0, shift_cols=0.0625, shift_rows=-0.09375, shear_degrees=10.0,
    zoom_cols=1.1, zoom_rows=0.9,
)  # fmt: skip


def _image_data_generator(images, flip, output_size):
    """ImageDataGenerator.apply_transform (Keras 3's legacy copy), then a resize.

    ImageDataGenerator applies its matrices in (col, row) order, so its tx moves
    columns and zx zooms columns (on square images the pixel counts agree).
    """
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(fill_mode="nearest")
    size = images.shape[1]
    parameters = {
        "theta": TRANSFORM["rotation_degrees"],
        "tx": TRANSFORM["shift_cols"] * size,
        "ty": TRANSFORM["shift_rows"] * size,
        "shear": TRANSFORM["shear_degrees"],
        "zx": TRANSFORM["zoom_cols"],
        "zy": TRANSFORM["zoom_rows"],
        "flip_horizontal": flip,
    }
    transformed = np.stack([generator.apply_transform(image, parameters) for image in images])
    return tf.image.resize(transformed, output_size).numpy()


@pytest.mark.parametrize("flip", [False, True])
def test_matches_image_data_generator_at_the_source_size(flip):
    pytest.importorskip("scipy")
    images = _images(2).astype(np.float32)
    expected = _image_data_generator(images, flip, (32, 32))
    fused = augment.affine_resize(images, _parameters(2, flip=int(flip), **TRANSFORM), (32, 32))
    # Same sampling points, both bilinear with edge repetition: equal up to float error.
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-2)


def test_matches_image_data_generator_then_resize_on_smooth_images():
    pytest.importorskip("scipy")
    images = _smooth_images()
    expected = _image_data_generator(images, True, (96, 96))
    fused = augment.affine_resize(images, _parameters(2, flip=1, **TRANSFORM), (96, 96))
    # One interpolation against two. Measured on these smooth images: 0.62 levels of
    # 255 on average, 15 at most (at the fill border, where the two-pass path fills
    # at 32 px before it interpolates). A wrong convention (axis order, rotation
    # sign) measured about 70 on average, so the mean bound is the sharp check.
    difference = np.abs(fused.numpy() - expected)
    assert difference.mean() < 1.5 and difference.max() < 32, (difference.mean(), difference.max())


FULL = augment.AugmentConfig(
    rotation_degrees=40, shift_fraction=0.2, shear_degrees=5, zoom_fraction=0.2,
    horizontal_flip=True,
)  # fmt: skip


def test_layer_augments_only_in_training_and_advances_its_step():
    layer = augment.AugmentResize(40, augment=FULL, seed=3)
    images = _images(4, size=16)
    resized = tf.image.resize(images.astype(np.float32), (40, 40)).numpy()
    np.testing.assert_allclose(layer(images, training=False).numpy(), resized, atol=1e-4)
    np.testing.assert_allclose(layer(images).numpy(), resized, atol=1e-4)
    assert int(layer.step.numpy()) == 0
    first = layer(images, training=True).numpy()
    second = layer(images, training=True).numpy()
    assert int(layer.step.numpy()) == 2
    assert np.abs(first - resized).mean() > 5 and np.abs(second - first).mean() > 5


def test_layer_draws_follow_the_seed_and_step():
    images = _images(4, size=16)

    def first_draw(seed):
        return augment.AugmentResize(24, augment=FULL, seed=seed)(images, training=True).numpy()

    np.testing.assert_array_equal(first_draw(5), first_draw(5))
    assert not np.allclose(first_draw(5), first_draw(6))
    expected = augment.affine_resize(
        images, augment.sample_parameters(augment.make_key(5, 0, 0), 4, FULL), (24, 24)
    )
    # The layer samples under XLA; float error on the 0..255 scale measured 4e-4.
    np.testing.assert_allclose(first_draw(5), expected.numpy(), atol=1e-2)


def test_layer_without_augmentation_only_resizes_in_training():
    layer = augment.AugmentResize(24, augment=None)
    images = _images(2, size=16)
    expected = tf.image.resize(images.astype(np.float32), (24, 24)).numpy()
    np.testing.assert_allclose(layer(images, training=True).numpy(), expected, atol=1e-4)


def test_layer_output_follows_the_mixed_precision_policy():
    layer = augment.AugmentResize(24, augment=FULL, dtype="mixed_bfloat16")
    assert layer(_images(1, size=16), training=True).dtype == tf.bfloat16


def test_layer_config_round_trips():
    layer = augment.AugmentResize(24, augment=FULL, seed=9, name="resize")
    rebuilt = augment.AugmentResize.from_config(layer.get_config())
    assert (rebuilt.image_size, rebuilt.augment, rebuilt.seed) == (24, FULL, 9)


def test_a_keras_model_with_the_layer_trains_under_xla():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), dtype="uint8")
    x = augment.AugmentResize(24, augment=FULL, name="resize")(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    # Explicit jit_compile=True: the whole train step, augmentation included, is one
    # XLA computation, or compile fails (a Keras RandomRotation here would).
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    images, labels = _images(8, size=16), np.arange(8) % 3
    history = model.fit(images, labels, batch_size=4, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(model.get_layer("resize").step.numpy()) == 4
    model.evaluate(images, labels, batch_size=4, verbose=0)
    assert int(model.get_layer("resize").step.numpy()) == 4


_TWO_REPLICAS = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from effpipe.model import augment
config = augment.AugmentConfig(rotation_degrees=40, shift_fraction=0.2, horizontal_flip=True)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = augment.AugmentResize(24, augment=config, seed=3)
images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8))

@tf.function
def step():
    return strategy.run(lambda: layer(images, training=True))

replicas = [r.numpy() for r in strategy.experimental_local_results(step())]
single = augment.AugmentResize(24, augment=config, seed=3)(images, training=True).numpy()
print(json.dumps({
    "replicas": len(replicas),
    "replicas_differ": bool(np.abs(replicas[0] - replicas[1]).mean() > 5),
    "first_replica_is_single_device_draw": bool(np.allclose(replicas[0], single, atol=1e-3)),
    "step_after_one_call": int(layer.step.numpy()),
}))
"""


def test_two_replicas_draw_different_transforms_for_the_same_step(repo_root):
    # Logical devices must be set before TensorFlow starts: a fresh process.
    result = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICAS],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {
        "replicas": 2,
        "replicas_differ": True,
        "first_replica_is_single_device_draw": True,
        "step_after_one_call": 1,
    }
