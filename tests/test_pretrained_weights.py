"""Every pretrained base is the network Keras builds for weights="imagenet".

Keras' EfficientNet adds a stem Rescaling (a second division by the ImageNet standard
deviation) only when its constructor downloads the weights; a base built plain and
loaded from the same file computes another function. No network here: Keras' download
is answered by a local file in Keras' legacy notop format.
"""

import re

import h5py
import keras
import numpy as np
import pytest
from keras.src.applications import efficientnet as keras_efficientnet

from effpipe.model import efficientnet

IMAGE_SIZE = 32
# Keras names only the stem's first layers itself, after their class and a counter
# that runs over the process ("rescaling_3").
GENERATED_NAME = re.compile(r"(input_layer|rescaling|normalization)(_\d+)?")
# Keras' EfficientNet stem in the order it builds it for weights="imagenet".
IMAGENET_STEM = ["InputLayer", "Rescaling", "Normalization", "Rescaling", "ZeroPadding2D"]


def _write_legacy_notop_h5(base: keras.Model, path: str) -> None:
    """Writes `base` in the layout of Keras' downloads (efficientnetb0_notop.h5).

    The legacy HDF5 weights layout, as keras.src.legacy.saving.legacy_h5_format's
    save_weights_to_hdf5_group writes it: the root lists every layer in the model's
    order; each layer's group lists its weights, trainable first. Keras loads it by
    order, matching the layers that have weights.
    """
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [layer.name.encode("utf8") for layer in base.layers]
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.6.0"
        for layer in base.layers:
            group = file.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{w.name}:0".encode() for w in weights]
            group.attrs["weight_names"] = names
            for name, weight in zip(names, weights):
                group.create_dataset(name, data=np.asarray(weight))


@pytest.fixture(scope="module")
def legacy_notop_file(tmp_path_factory):
    """A B0 notop file of random tensors, with ImageNet's input statistics in the
    Normalization layer as in Keras' file, and perturbed BatchNormalization statistics
    so that the top features are far from zero."""
    keras.utils.set_random_seed(3)
    source = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    rng = np.random.default_rng(3)
    normalization = next(
        layer for layer in source.layers if isinstance(layer, keras.layers.Normalization)
    )
    _, _, count = normalization.get_weights()
    mean = np.array([0.485, 0.456, 0.406], "float32")
    variance = np.array([0.229, 0.224, 0.225], "float32") ** 2
    normalization.set_weights([mean, variance, count])
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_variance.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.1, size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype("float32"))
    path = str(tmp_path_factory.mktemp("weights") / "efficientnetb0_notop.h5")
    _write_legacy_notop_h5(source, path)
    return path


@pytest.fixture
def answered_download(monkeypatch, legacy_notop_file):
    """Answers Keras' ImageNet weight download with the local file; records the calls."""
    calls = []

    def get_file(fname, origin, **kwargs):
        calls.append((fname, origin))
        return legacy_notop_file

    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", get_file)
    return calls


def _layer_list(base: keras.Model) -> list[tuple[str, str | None, dict]]:
    """(class name, name unless Keras generated it, the rest of its config) per layer."""
    listed = []
    for layer in base.layers:
        # Whether a layer is frozen is the phases' business, not the network's.
        config = {
            key: value
            for key, value in layer.get_config().items()
            if key not in ("name", "trainable")
        }
        generated = GENERATED_NAME.fullmatch(layer.name) is not None
        listed.append((type(layer).__name__, None if generated else layer.name, config))
    return listed


def _activations(base: keras.Model, layer_name: str, images: np.ndarray) -> np.ndarray:
    return np.asarray(keras.Model(base.input, base.get_layer(layer_name).output)(images))


def _images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype("float64"), b.astype("float64")
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_weights_path_builds_the_network_weights_imagenet_builds(
    answered_download, legacy_notop_file
):
    from_download = efficientnet.make_base("b0", IMAGE_SIZE, "imagenet")
    from_path = efficientnet.make_base("b0", IMAGE_SIZE, legacy_notop_file)
    images = _images()
    for layer_name in ["stem_conv", "top_activation"]:
        expected = _activations(from_download, layer_name, images)
        actual = _activations(from_path, layer_name, images)
        # The same operations on the same tensors: equal to the last bit.
        difference = _relative_difference(expected, actual)
        assert difference == 0.0, f"{layer_name}: relative difference {difference:.4f}"
    # The top features are well scaled, so the comparison there means something.
    assert np.abs(expected).mean() > 1e-2
    assert [type(layer).__name__ for layer in from_path.layers[:5]] == IMAGENET_STEM
    assert _layer_list(from_path) == _layer_list(from_download)
    assert from_download.name == from_path.name == efficientnet.BASE_NAME
    # Keras names the file it fetches after the model: the B0 file, not "base_notop.h5".
    assert [fname for fname, _ in answered_download] == ["efficientnetb0_notop.h5"]
    assert answered_download[0][1].endswith("/keras-applications/efficientnetb0_notop.h5")


def test_the_plain_network_on_the_same_file_computes_another_function(legacy_notop_file):
    # What --weights=PATH built before: the comparison above can fail.
    plain = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    plain.load_weights(legacy_notop_file)
    from_path = efficientnet.make_base("b0", IMAGE_SIZE, legacy_notop_file)
    images = _images()
    stem_difference = _relative_difference(
        _activations(from_path, "stem_conv", images), _activations(plain, "stem_conv", images)
    )
    assert stem_difference > 0.1


def test_a_keras3_weights_file_of_a_pretrained_base_round_trips(tmp_path, legacy_notop_file):
    saved = efficientnet.make_base("b0", IMAGE_SIZE, legacy_notop_file)
    path = str(tmp_path / "saved.weights.h5")
    saved.save_weights(path)
    loaded = efficientnet.make_base("b0", IMAGE_SIZE, path)
    assert _layer_list(loaded) == _layer_list(saved)
    for loaded_tensor, saved_tensor in zip(loaded.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(loaded_tensor, saved_tensor)
    images = _images()
    np.testing.assert_array_equal(
        _activations(loaded, "top_activation", images),
        _activations(saved, "top_activation", images),
    )


def test_weights_files_load_across_the_two_structures(tmp_path):
    # The inserted Rescaling has no weights, so the two structures store the same
    # tensors under the same paths: a file of either loads into the other exactly.
    keras.utils.set_random_seed(4)
    plain = efficientnet.make_base("b0", IMAGE_SIZE, "none")
    plain_path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(plain_path)
    from_plain = efficientnet.make_base("b0", IMAGE_SIZE, plain_path)
    assert [type(layer).__name__ for layer in from_plain.layers[:5]] == IMAGENET_STEM
    for loaded_tensor, saved_tensor in zip(from_plain.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(loaded_tensor, saved_tensor)
    # And back: a file saved from the ImageNet network into a plain one.
    imagenet_path = str(tmp_path / "imagenet.weights.h5")
    from_plain.save_weights(imagenet_path)
    plain_again = efficientnet.make_base("b0", IMAGE_SIZE, "none")
    plain_again.load_weights(imagenet_path)
    for loaded_tensor, saved_tensor in zip(plain_again.get_weights(), from_plain.get_weights()):
        np.testing.assert_array_equal(loaded_tensor, saved_tensor)


@pytest.mark.parametrize("weights", ["imagenet", "path"])
def test_random_weights_of_a_pretrained_config_build_the_imagenet_network(
    answered_download, legacy_notop_file, weights
):
    weights = legacy_notop_file if weights == "path" else weights
    small = dict(variant="b0", image_size=IMAGE_SIZE, source_size=(16, 16), num_classes=3)
    random = efficientnet.get_base(
        efficientnet.make_model(weights=weights, random_weights=True, **small)
    )
    # Nothing fetched or loaded: random weights in the pretrained network.
    assert answered_download == []
    loaded = efficientnet.get_base(efficientnet.make_model(weights="imagenet", **small))
    assert _layer_list(random) == _layer_list(loaded)
    assert not np.array_equal(
        random.get_layer("stem_conv").get_weights()[0],
        loaded.get_layer("stem_conv").get_weights()[0],
    )


def test_weights_none_keeps_the_plain_network():
    base = efficientnet.make_base("b0", IMAGE_SIZE, "none")
    plain = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    assert [type(layer).__name__ for layer in base.layers[:4]] == [
        "InputLayer", "Rescaling", "Normalization", "ZeroPadding2D",
    ]  # fmt: skip
    assert _layer_list(base) == _layer_list(plain)


def test_the_imagenet_network_follows_the_mixed_precision_policy(
    answered_download, legacy_notop_file
):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        from_download = efficientnet.make_base("b0", IMAGE_SIZE, "imagenet")
        from_path = efficientnet.make_base("b0", IMAGE_SIZE, legacy_notop_file)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert _layer_list(from_path) == _layer_list(from_download)
    assert from_path.layers[3].compute_dtype == "bfloat16"


def test_copy_weights_carries_the_input_statistics(legacy_notop_file):
    small = dict(variant="b0", image_size=IMAGE_SIZE, source_size=(16, 16), num_classes=3)
    trained = efficientnet.make_model(weights=legacy_notop_file, **small)
    copy = efficientnet.make_model(weights=legacy_notop_file, random_weights=True, **small)
    efficientnet.copy_weights(trained, copy)
    images = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(copy(images)), np.asarray(trained(images)))
    # set_weights alone leaves the Normalization computing with the random base's
    # statistics: the check above can fail.
    stale = efficientnet.make_model(weights=legacy_notop_file, random_weights=True, **small)
    stale.set_weights(trained.get_weights())
    features = [
        _activations(efficientnet.get_base(m), "stem_conv", _images()) for m in (trained, stale)
    ]
    assert _relative_difference(*features) > 0.1
