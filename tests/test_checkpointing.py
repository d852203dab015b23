"""BestCheckpoint: saves on improvement only, atomically, never from a diverged epoch."""

import os

import keras
import numpy as np
import pytest

from effpipe import checkpointing


@pytest.fixture
def model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def _kernel(path):
    reference = keras.Model.from_config(_model_config())
    reference.load_weights(path)
    return reference.layers[-1].kernel.numpy()


def _model_config():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs)).get_config()


def test_saves_only_when_the_monitored_value_improves(tmp_path, model):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = checkpointing.BestCheckpoint(path, best=0.5)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.4})
    assert not os.path.exists(path) and not checkpoint.saved
    checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": 0.6})
    assert checkpoint.saved and checkpoint.best == 0.6
    np.testing.assert_array_equal(_kernel(path), model.layers[-1].kernel.numpy())


def test_a_diverged_epoch_is_never_saved(tmp_path, model):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = checkpointing.BestCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": float("nan"), "val_accuracy": 0.9})
    checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": float("inf")})
    assert not os.path.exists(path) and checkpoint.best is None


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = checkpointing.BestCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.5})
    saved_kernel = _kernel(path)

    def crash(filepath, *args, **kwargs):
        with open(filepath, "wb") as file:
            file.write(b"\x89HDF half a file")
        raise OSError("disk full")

    model.layers[-1].kernel.assign(np.ones((3, 2), np.float32))
    monkeypatch.setattr(model, "save_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": 0.7})
    np.testing.assert_array_equal(_kernel(path), saved_kernel)
    assert os.listdir(tmp_path) == ["best.weights.h5"] and checkpoint.best == 0.5
