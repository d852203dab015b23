"""The variant table, weight loading, heads, mixed precision and block unfreezing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from effpipe import variants
from effpipe.errors import UsageError
from effpipe.model import batch_norm, efficientnet, freezing

SMALL = dict(variant="b0", image_size=32, source_size=(16, 16), num_classes=5)


@pytest.fixture
def model():
    keras.utils.set_random_seed(0)
    return efficientnet.make_model(weights="none", **SMALL)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variant_table_matches_keras_native_resolution(name):
    variant = variants.VARIANTS[name]
    constructor = getattr(keras.applications, variant.keras_constructor)
    # With its top and no input shape, Keras builds the variant at its default size.
    reference = constructor(include_top=True, weights=None)
    assert reference.input_shape[1:3] == (variant.native_image_size,) * 2


def test_native_sizes_are_the_papers():
    sizes = {name: v.native_image_size for name, v in variants.VARIANTS.items()}
    assert sizes == {
        "b0": 224, "b1": 240, "b2": 260, "b3": 300,
        "b4": 380, "b5": 456, "b6": 528, "b7": 600,
    }  # fmt: skip


def test_model_takes_uint8_source_images_and_returns_probabilities(model):
    assert model.input.dtype == "uint8"
    assert model.input_shape == (None, 16, 16, 3)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    probabilities = np.asarray(model(images))
    assert probabilities.shape == (3, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert efficientnet.get_base(model).input_shape == (None, 32, 32, 3)


def test_resize_layer_outside_training_equals_a_plain_bilinear_resize(model):
    images = np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    resized = np.asarray(model.get_layer("resize")(images, training=False))
    # tf.image.resize is the reference: bilinear with half-pixel centres.
    expected = tf.image.resize(images.astype("float32"), (32, 32), method="bilinear")
    assert resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected.numpy(), atol=1e-4)


def test_heads_are_in_their_documented_order():
    def head_layers(head):
        built = efficientnet.make_model(weights="none", head=head, **SMALL)
        names = [layer.name for layer in built.layers]
        return names[names.index(efficientnet.BASE_NAME) + 1 :]

    assert head_layers("pooled") == ["head_pool", "head_bn", "head_dropout", "predictions"]
    assert head_layers("notebook") == ["head_bn", "head_dropout", "head_pool", "predictions"]
    assert head_layers("keras") == ["head_pool", "head_dropout", "predictions"]


def test_mixed_precision_keeps_the_softmax_in_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        built = efficientnet.make_model(weights="none", **SMALL)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert built.get_layer("predictions").compute_dtype == "float32"
    assert efficientnet.get_base(built).get_layer("stem_conv").compute_dtype == "bfloat16"
    images = np.zeros((1, 16, 16, 3), np.uint8)
    assert built(images).dtype == "float32"


def test_weights_path_loads_exactly_the_saved_tensors(tmp_path):
    keras.utils.set_random_seed(1)
    saved_base = efficientnet.make_base("b0", 32, "none")
    path = str(tmp_path / "b0_notop.weights.h5")
    saved_base.save_weights(path)
    keras.utils.set_random_seed(2)
    loaded = efficientnet.make_model(weights=path, **SMALL)
    unloaded = efficientnet.make_model(weights="none", **SMALL)
    loaded_weights = efficientnet.get_base(loaded).get_weights()
    saved_weights = saved_base.get_weights()
    assert len(loaded_weights) == len(saved_weights)
    for loaded_tensor, saved_tensor in zip(loaded_weights, saved_weights):
        np.testing.assert_array_equal(loaded_tensor, saved_tensor)
    # A model that did not load the file differs, so the comparison can fail.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(efficientnet.get_base(unloaded).get_weights(), saved_weights)
    )


# Keras warns once per mismatched layer before it raises; the raise is what counts.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_of_another_variant_or_a_missing_file_are_refused(tmp_path):
    path = str(tmp_path / "b1_notop.weights.h5")
    efficientnet.make_base("b1", 32, "none").save_weights(path)
    with pytest.raises(UsageError, match="does not fit the b0 base"):
        efficientnet.make_base("b0", 32, path)
    with pytest.raises(UsageError, match="does not exist"):
        efficientnet.make_base("b0", 32, str(tmp_path / "missing.weights.h5"))


def _trainable_layer_names(base):
    return {layer.name for layer in base.layers if layer.trainable and layer.weights}


def test_phase1_freezes_the_whole_base(model):
    freezing.freeze_base(model)
    base = efficientnet.get_base(model)
    assert not base.trainable_weights
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"head_bn", "predictions"}


def test_phase2_unfreezes_exactly_the_requested_blocks(model):
    base = efficientnet.get_base(model)
    blocks = freezing.block_names(base)
    assert len(blocks) == 16 and blocks[:3] == ["1a", "2a", "2b"] and blocks[-1] == "7a"
    unfrozen = freezing.unfreeze_top_blocks(model, 3)
    assert unfrozen == ["6c", "6d", "7a"]
    trainable = _trainable_layer_names(base)
    assert "top_conv" in trainable
    assert {"block6c_expand_conv", "block6d_dwconv", "block7a_project_conv"} <= trainable
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        block = layer.name.split("_")[0]
        below = layer.name.startswith("stem") or (
            block.startswith("block") and block[len("block") :] not in unfrozen
        )
        if below:
            assert not layer.trainable, layer.name
    # Every weighted non-BN layer of the unfrozen blocks is trainable.
    for layer in base.layers:
        in_region = layer.name.startswith("top_") or layer.name[5:7] in unfrozen
        if in_region and layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            assert layer.trainable, layer.name


def test_phase2_can_let_batch_norm_train_for_a_base_from_scratch(model):
    freezing.unfreeze_top_blocks(model, 1, freeze_batch_norm=False)
    base = efficientnet.get_base(model)
    assert base.get_layer("block7a_bn").trainable
    assert not base.get_layer("block6d_bn").trainable


def test_unfreezing_more_blocks_than_the_base_has_is_refused(model):
    with pytest.raises(UsageError, match="more than the 16 blocks"):
        freezing.unfreeze_top_blocks(model, 17)


def test_calibration_averages_batch_statistics_and_restores_state(model):
    base = efficientnet.get_base(model)
    stem_bn = base.get_layer("stem_bn")
    before = np.asarray(stem_bn.moving_variance).copy()
    images = np.random.default_rng(0).integers(0, 255, (64, 16, 16, 3), dtype=np.uint8)
    batch_norm.calibrate_batch_norm(model, images, batch_size=32)
    assert not np.allclose(np.asarray(stem_bn.moving_variance), before)
    # Two equal batches: the moving mean is the mean of the stem conv's outputs.
    stem = keras.Model(base.input, base.get_layer("stem_conv").output)
    expected_mean = np.asarray(stem(model.get_layer("resize")(images))).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(stem_bn.moving_mean), expected_mean, atol=1e-4)
    assert stem_bn.momentum == pytest.approx(0.99)
    assert not base.trainable
    # The top features are now well scaled instead of ~1e-6.
    features = base(model.get_layer("resize")(images), training=False)
    assert float(np.abs(np.asarray(features)).mean()) > 1e-2


def test_calibration_keeps_the_phase2_trainable_flags(model):
    freezing.unfreeze_top_blocks(model, 2, freeze_batch_norm=False)
    base = efficientnet.get_base(model)
    before = {layer.name: layer.trainable for layer in base.layers}
    images = np.zeros((8, 16, 16, 3), np.uint8)
    batch_norm.calibrate_batch_norm(model, images, batch_size=4)
    assert {layer.name: layer.trainable for layer in base.layers} == before
    assert base.trainable


def test_a_pretrained_base_runs_in_inference_mode_when_training(tmp_path):
    # Keras 3 passes the outer training flag into a nested model; the base's
    # stochastic depth must stay off all the same, so its features never change.
    path = str(tmp_path / "b0_notop.weights.h5")
    efficientnet.make_base("b0", 32, "none").save_weights(path)
    model = efficientnet.make_model(weights=path, **SMALL)
    features = keras.Model(model.input, model.get_layer("head_pool").output)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    inference = features(images, training=False).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(features(images, training=True).numpy(), inference)


def test_a_base_from_scratch_starts_its_residual_blocks_as_the_identity():
    keras.utils.set_random_seed(0)
    base = efficientnet.get_base(efficientnet.make_model(weights="none", **SMALL))
    names = {layer.name for layer in base.layers}
    residual = [n for n in names if n.endswith("_add")]
    assert len(residual) == 9  # B0: 16 blocks, the first of each of its 7 stages without skip.
    for name in residual:
        gamma = base.get_layer(name.replace("_add", "_project_bn")).gamma.numpy()
        np.testing.assert_array_equal(gamma, 0.0)
    # Blocks without a skip, and every other BatchNormalization, keep Keras' scale 1.
    assert base.get_layer("block1a_project_bn").gamma.numpy().min() == 1.0
    assert base.get_layer("block2a_project_bn").gamma.numpy().min() == 1.0
    # So each residual block returns its input: its output equals what it adds to.
    block = keras.Model(
        base.input,
        [base.get_layer("block2b_add").output, base.get_layer("block2a_project_bn").output],
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    added, skipped = block(images, training=True)
    np.testing.assert_array_equal(added.numpy(), skipped.numpy())
    keras.utils.set_random_seed(0)
    plain = efficientnet.get_base(
        efficientnet.make_model(weights="none", zero_init_residual=False, **SMALL)
    )
    assert plain.get_layer("block2b_project_bn").gamma.numpy().min() == 1.0


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_stochastic_depth_from_scratch_scales_keras_linear_rates(rate):
    base = efficientnet.get_base(
        efficientnet.make_model(weights="none", stochastic_depth=rate, **SMALL)
    )
    drops = [layer for layer in base.layers if isinstance(layer, keras.layers.Dropout)]
    # Keras drops block b of 16 at 0.2 * b / 16; the last block (16a, no skip) has none.
    assert [layer.name for layer in drops][-1] == "block6d_drop"
    assert drops[-1].rate == pytest.approx(rate * 14 / 16)
    assert base.get_layer("block2b_drop").rate == pytest.approx(rate * 2 / 16)


def test_from_scratch_flags_need_a_keras_that_names_blocks_as_3_15_does():
    # The zero-init finds residual blocks by Keras' layer names: a Keras that
    # renames them must fail loudly, not train with Keras' initialisation.
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(UsageError, match="blockNx_project_bn"):
        efficientnet.zero_init_residual_branches(plain)
