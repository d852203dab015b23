"""Phase 1 on cached features: the same head as without the cache, and resumable.

The trainer runs in-process on a tiny configuration (B0 at 32 px, 48 shapes images)
with a "pretrained" base: random weights whose BatchNormalization statistics were
calibrated, saved to a file and loaded as a pretrained base is.
"""

import json
import os
import signal

import h5py
import keras
import numpy as np
import pytest
from binaries import run_train

from effpipe import faults
from effpipe.config import TrainConfig
from effpipe.model import batch_norm, efficientnet, factory
from effpipe.training import feature_cache, run_state, trainer


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = efficientnet.make_model(
        variant="b0", image_size=32, source_size=(32, 32), num_classes=4, weights="none"
    )
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    batch_norm.calibrate_batch_norm(model, images, 16)
    path = str(tmp_path_factory.mktemp("base") / "b0_notop.weights.h5")
    efficientnet.get_base(model).save_weights(path)
    keras.backend.clear_session()
    return path


def _config(base_weights, cache, **overrides):
    return TrainConfig.from_flat(
        dataset="shapes", shapes_num_classes=4, shapes_train_examples=48,
        shapes_test_examples=8, variant="b0", image_size=32, weights=base_weights,
        augment=False, batch_size=8, phase1_epochs=2, phase1_learning_rate=1e-2,
        phase2_epochs=0, deterministic=True, export=False,
        phase1_feature_cache=cache, **overrides,
    )  # fmt: skip


def _train(config, workdir):
    metrics = trainer.train_and_evaluate(config, str(workdir))
    keras.backend.clear_session()
    history = json.loads((workdir / "history.json").read_text())
    return history, metrics


def _saved_tensors(path):
    """Every tensor of a .weights.h5 file (model and optimizer), by its path."""
    tensors = {}
    with h5py.File(path) as weights:
        weights.visititems(
            lambda name, item: (
                tensors.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return tensors


def _figures(history):
    keys = ("loss", "accuracy", "val_loss", "val_accuracy", "val_top5")
    return [[record[key] for key in keys] for record in history["phase1"] + history["phase2"]]


@pytest.fixture(scope="module")
def uncached_and_cached(base_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    off = _train(_config(base_weights, "off"), folder / "off")
    on = _train(_config(base_weights, "on"), folder / "on")
    return folder, off, on


def test_phase1_on_the_cache_stores_the_features_and_trains_the_head_model(uncached_and_cached):
    folder, (history_off, metrics_off), (history_on, metrics_on) = uncached_and_cached
    assert (metrics_off["phase1_feature_cache"], metrics_on["phase1_feature_cache"]) == (
        False,
        True,
    )
    assert len(history_on["phase1"]) == len(history_off["phase1"]) == 2
    # B0's pooled features: 1280 floats per image, 48 - 5 train and 5 validation.
    with np.load(folder / "on" / feature_cache.CACHE_FILE) as stored:
        assert stored["train"].shape == (43, 1280) and stored["validation"].shape == (5, 1280)
        assert stored["train"].dtype == np.float32
    assert not (folder / "off" / "cache").exists()


# Known defect, open: on the AMD EPYC (AVX only) machine of 2026-12-03 the two runs
# differ from the first training step (loss 2.0724 against 2.0305 with the cache), at
# every commit back to 810aafc, while they agreed bit for bit on the earlier Intel
# machines. There the training step's forward pass rounds some rows of a batch
# otherwise than `predict` does, by the row's place, and the random base amplifies it
# to percents (git history of WORKSPACE.md, "Open defects", has the measurements).
@pytest.mark.xfail(
    reason="the cached and uncached runs differ on an AMD EPYC (known defect, see above)",
    strict=False,
)
def test_phase1_on_the_cache_trains_the_same_head(uncached_and_cached):
    folder, (history_off, metrics_off), (history_on, metrics_on) = uncached_and_cached
    # The same batches in the same order, the same dropout masks, the same features:
    # on CPU with --deterministic the two runs agree bit for bit, in every epoch's
    # figures, the final test metrics, the best checkpoint (saved from the head fit,
    # it holds the full model) and the resume state (weights, optimizer variables).
    assert _figures(history_on) == _figures(history_off)
    assert (metrics_on["top1"], metrics_on["loss"]) == (metrics_off["top1"], metrics_off["loss"])
    for saved in (os.path.join("checkpoints", "best.weights.h5"), "state/epoch-0002.weights.h5"):
        tensors_off = _saved_tensors(folder / "off" / saved)
        tensors_on = _saved_tensors(folder / "on" / saved)
        assert len(tensors_off) > 300 and tensors_on.keys() == tensors_off.keys()
        for name, tensor in tensors_off.items():
            np.testing.assert_array_equal(tensors_on[name], tensor, err_msg=f"{saved}: {name}")


class _Killed(Exception):
    pass


def test_a_resumed_run_reuses_the_cache_and_finishes_identically(
    uncached_and_cached, base_weights, tmp_path, monkeypatch
):
    _, _, (history_on, metrics_on) = uncached_and_cached
    config = _config(base_weights, "on")
    save_epoch = run_state.EpochStateSaver.on_epoch_end

    def killed_after_the_first_epoch(self, epoch, logs=None):
        save_epoch(self, epoch, logs)
        raise _Killed()

    with monkeypatch.context() as patch:
        patch.setattr(run_state.EpochStateSaver, "on_epoch_end", killed_after_the_first_epoch)
        with pytest.raises(_Killed):
            trainer.train_and_evaluate(config, str(tmp_path))
    keras.backend.clear_session()
    cache_file = tmp_path / feature_cache.CACHE_FILE
    assert json.loads((tmp_path / "state" / "state.json").read_text())["epochs_done"] == 1
    written = cache_file.stat().st_mtime_ns

    predict = keras.Model.predict

    def no_feature_passes(self, *args, **kwargs):
        # The final evaluation predicts with the full model; the features' model
        # must not run again.
        if self.name == "features":
            raise AssertionError("the features were computed again")
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "predict", no_feature_passes)
    history, metrics = _train(config, tmp_path)
    assert cache_file.stat().st_mtime_ns == written
    assert _figures(history) == _figures(history_on)
    assert (metrics["top1"], metrics["loss"]) == (metrics_on["top1"], metrics_on["loss"])


def test_a_cache_of_another_setup_is_computed_again(tmp_path):
    path = str(tmp_path / "features.npz")
    first = feature_cache.load_or_compute(
        path, {"run": 1}, lambda: np.ones((3, 2)), lambda: np.zeros((1, 2))
    )
    again = feature_cache.load_or_compute(path, {"run": 1}, None, None)
    other = feature_cache.load_or_compute(
        path, {"run": 2}, lambda: np.full((3, 2), 2.0), lambda: np.zeros((1, 2))
    )
    assert (first.reused, again.reused, other.reused) == (False, True, False)
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(other.train, np.full((3, 2), 2.0))
    assert first.train.dtype == np.float32 and first.megabytes == 32 / 1e6


@pytest.mark.parametrize("head", ["pooled", "keras"])
def test_the_head_model_trains_the_full_models_head_under_bfloat16(base_weights, head):
    # Under mixed_bfloat16 the features come out in bfloat16; float32 holds them
    # exactly, and the head casts them back: one step on the head model equals one
    # step on the full model.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(8) % 4
        results, heads = [], []
        for use_cache in (False, True):
            keras.utils.set_random_seed(0)
            model = efficientnet.make_model(
                variant="b0", image_size=32, source_size=(32, 32), num_classes=4,
                weights=base_weights, head=head,
            )  # fmt: skip
            factory.compile_model(model, 1e-2, jit_compile=False)
            if use_cache:
                features = feature_cache.make_feature_model(model).predict(images, verbose=0)
                assert features.dtype.name == "bfloat16"
                head = feature_cache.make_head_model(model)
                factory.compile_model(head, 1e-2, jit_compile=False, optimizer=model.optimizer)
                results.append(head.train_on_batch(features.astype(np.float32), labels))
            else:
                results.append(model.train_on_batch(images, labels))
            heads.append([w.numpy() for w in model.get_layer("predictions").weights])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert results[0] == results[1]
    for uncached, cached in zip(*heads):
        np.testing.assert_array_equal(cached, uncached)


def test_the_seed_head_has_no_cacheable_features():
    model = efficientnet.make_model(
        variant="b0", image_size=32, source_size=(16, 16), num_classes=3, weights="none",
        head="notebook",
    )  # fmt: skip
    with pytest.raises(ValueError, match="pooled and keras heads"):
        feature_cache.make_head_model(model)


def test_a_kill_in_the_feature_pass_or_its_write_leaves_nothing_a_rerun_trusts(tmp_path):
    # The binary, SIGKILLed (effpipe.faults) between the two splits' passes, then
    # inside the cache file's write; the third start computes, saves and trains. Under
    # --mixed_precision, which resolves to bfloat16 on a CPU, without loss scaling.
    workdir = tmp_path / "run"
    command = (
        "--flagfile=flags/smoke.flags", "--image_size=32", "--noaugment", "--noexport",
        "--phase1_feature_cache=on", "--phase2_epochs=0", "--mixed_precision",
        f"--workdir={workdir}",
    )  # fmt: skip
    cache_file = workdir / feature_cache.CACHE_FILE
    for point in ("feature_cache", "write:phase1_features"):
        killed = run_train(*command, env={faults.KILL_ENV: point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not cache_file.exists() and not (workdir / "state").exists(), point
    assert list(cache_file.parent.glob(".tmp-*phase1_features.npz"))  # The killed write's.
    result = run_train(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"computed once and saved to {cache_file}" in result.stderr
    assert not list(workdir.rglob(".tmp-*"))
    with np.load(cache_file) as stored:
        assert len(stored["train"]) == 180 and len(stored["validation"]) == 20
    history = json.loads((workdir / "history.json").read_text())
    assert len(history["phase1"]) == 1 and history["phase2"] == []
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["phase1_feature_cache"] is True
    assert metrics["precision"] == "mixed_bfloat16" and metrics["loss_scaling"] is False
