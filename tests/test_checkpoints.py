"""BestCheckpoint: saves on improvement only, atomically, never from a diverged epoch."""

import os
import types

import keras
import numpy as np
import pytest

from effpipe.training import checkpoints, run_state


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
    checkpoint = checkpoints.BestCheckpoint(path, best=0.5)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.4})
    assert not os.path.exists(path) and not checkpoint.saved
    checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": 0.6})
    assert checkpoint.saved and checkpoint.best == 0.6
    np.testing.assert_array_equal(_kernel(path), model.layers[-1].kernel.numpy())


def test_a_diverged_epoch_is_never_saved(tmp_path, model):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = checkpoints.BestCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": float("nan"), "val_accuracy": 0.9})
    checkpoint.on_epoch_end(1, {"loss": 1.0, "val_accuracy": float("inf")})
    assert not os.path.exists(path) and checkpoint.best is None


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, model, monkeypatch):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = checkpoints.BestCheckpoint(path)
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


def test_published_best_weights_never_run_ahead_of_the_saved_state(tmp_path, model, monkeypatch):
    path = tmp_path / "checkpoints" / "best.weights.h5"
    state_dir = tmp_path / run_state.STATE_DIR
    checkpoint = checkpoints.BestCheckpoint(str(path), staging_dir=str(state_dir))
    meter = types.SimpleNamespace(records=[])
    saver = run_state.EpochStateSaver(
        str(tmp_path), 1, run_state.RunState.fresh(), meter, checkpoint
    )
    checkpoint.set_model(model)
    saver.set_model(model)

    def end_epoch(epoch, logs, callbacks=(checkpoint, saver)):
        meter.records.append({"epoch": epoch + 1, "seconds": 1.0})
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)

    end_epoch(0, {"loss": 1.0, "val_accuracy": 0.5})
    first = _kernel(path)
    assert run_state.load_state(str(tmp_path)).best_weights_file == "best-epoch-0001.weights.h5"

    # Killed after epoch 2's better weights were staged, before its state was saved:
    # the published checkpoint still agrees with the state (epoch 1).
    model.layers[-1].kernel.assign(np.ones((3, 2), np.float32))
    better = {"loss": 1.0, "val_accuracy": 0.7}
    end_epoch(1, better, callbacks=(checkpoint,))
    np.testing.assert_array_equal(_kernel(path), first)

    # Killed after the state named epoch 2's weights, before they were published:
    # the checkpoint is one improvement behind, and a resumed run publishes it.
    def killed():
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint, "publish", killed)
    with pytest.raises(SystemExit):
        saver.on_epoch_end(1, better)
    state = run_state.load_state(str(tmp_path))
    assert state.epochs_done == 2 and state.best_weights_file == "best-epoch-0002.weights.h5"
    np.testing.assert_array_equal(_kernel(path), first)
    run_state.publish_best(str(tmp_path), state, str(path))
    np.testing.assert_array_equal(_kernel(path), np.ones((3, 2), np.float32))
