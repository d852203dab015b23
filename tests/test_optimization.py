"""The phases' learning-rate schedules, optimizers, weight-decay exclusions and label
smoothing, in-process (the binary's per-epoch rates and a resume mid-schedule are in
test_resume.py)."""

import math

import keras
import numpy as np
import pytest

from effpipe.config import TrainConfig
from effpipe.model import efficientnet, factory
from effpipe.training import optimization

STEPS_PER_EPOCH = 10


def _epoch_end_rates(config, phase=1):
    """The rate of each epoch's last step, as history.json records it."""
    schedule = optimization.make_learning_rate(config, phase, STEPS_PER_EPOCH)
    epochs = getattr(config.phases, f"phase{phase}_epochs")
    return [
        optimization.rate_at(schedule, (epoch + 1) * STEPS_PER_EPOCH - 1) for epoch in range(epochs)
    ]


def test_the_constant_default_is_the_notebooks_rate_and_a_plain_float():
    config = TrainConfig.from_flat(phase1_learning_rate=1e-4, phase2_learning_rate=1e-5)
    assert optimization.make_learning_rate(config, 1, STEPS_PER_EPOCH) == 1e-4
    assert optimization.make_learning_rate(config, 2, STEPS_PER_EPOCH) == 1e-5
    optimizer = optimization.make_optimizer(config, 1e-4, keras.Sequential())
    assert type(optimizer) is keras.optimizers.Adam


def test_the_warm_up_rises_linearly_from_zero_then_holds_the_constant_rate():
    config = TrainConfig.from_flat(phase1_epochs=3, phase1_learning_rate=0.1, warmup_epochs=1.5)
    schedule = optimization.make_learning_rate(config, 1, STEPS_PER_EPOCH)
    rates = [optimization.rate_at(schedule, step) for step in range(30)]
    # 15 warm-up steps: step s runs at 0.1 * s / 15, then the constant 0.1.
    np.testing.assert_allclose(rates[:15], [0.1 * s / 15 for s in range(15)], rtol=1e-6)
    np.testing.assert_allclose(rates[15:], 0.1, rtol=1e-6)


def test_cosine_warms_up_then_falls_every_epoch_to_its_floor():
    config = TrainConfig.from_flat(
        phase1_epochs=8,
        phase1_learning_rate=0.1,
        lr_schedule="cosine",
        warmup_epochs=1,
        lr_min_fraction=0.1,
    )
    rates = _epoch_end_rates(config)
    schedule = optimization.make_learning_rate(config, 1, STEPS_PER_EPOCH)
    # The warm-up's last step is one step short of the peak; the peak is the rate.
    assert optimization.rate_at(schedule, 10) == pytest.approx(0.1)
    assert rates[0] == pytest.approx(0.1 * 9 / 10)
    assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:]))
    # The last step is one step before the end of the 70-step decay: the floor, 0.01,
    # plus (0.1 - 0.01) * (1 + cos(pi * 69 / 70)) / 2.
    assert rates[-1] == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 69 / 70)) / 2)
    assert rates[-1] == pytest.approx(0.01, abs=1e-4)


def test_each_phase_runs_its_own_schedule_over_its_own_epochs():
    config = TrainConfig.from_flat(
        phase1_epochs=2,
        phase1_learning_rate=0.1,
        phase2_epochs=4,
        phase2_learning_rate=0.01,
        lr_schedule="cosine",
    )
    phase1, phase2 = _epoch_end_rates(config, 1), _epoch_end_rates(config, 2)
    assert len(phase1) == 2 and len(phase2) == 4
    # Halfway through phase 2's own 40 steps the cosine is at half its rate.
    schedule = optimization.make_learning_rate(config, 2, STEPS_PER_EPOCH)
    assert optimization.rate_at(schedule, 20) == pytest.approx(0.005)
    assert optimization.rate_at(schedule, 0) == pytest.approx(0.01)


def test_exponential_decays_in_a_staircase_after_the_warm_up():
    config = TrainConfig.from_flat(
        phase1_epochs=6,
        phase1_learning_rate=0.1,
        lr_schedule="exponential",
        lr_decay_rate=0.5,
        lr_decay_epochs=2,
        warmup_epochs=0.5,
    )
    schedule = optimization.make_learning_rate(config, 1, STEPS_PER_EPOCH)
    assert optimization.rate_at(schedule, 0) == 0.0
    assert optimization.rate_at(schedule, 4) == pytest.approx(0.1 * 4 / 5)
    # After the 5 warm-up steps, halved every 20 steps.
    expected = {5: 0.1, 24: 0.1, 25: 0.05, 44: 0.05, 45: 0.025, 59: 0.025}
    for step, rate in expected.items():
        assert optimization.rate_at(schedule, step) == pytest.approx(rate), step


def test_the_batch_size_scaling_applies_to_the_schedule():
    config = TrainConfig.from_flat(
        phase1_epochs=2, phase1_learning_rate=0.1, base_batch_size=16, lr_schedule="cosine"
    )
    schedule = optimization.make_learning_rate(config, 1, STEPS_PER_EPOCH)
    assert optimization.rate_at(schedule, 0) == pytest.approx(0.1 * 32 / 16)


def _small_model():
    """Conv (bias) -> BatchNormalization -> a nested Dense (bias) model."""
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")])
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, inner(x))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_only_never_batch_norm_or_biases(kind):
    keras.utils.set_random_seed(0)
    model = _small_model()
    for variable in model.trainable_variables:
        variable.assign(np.full(variable.shape, 0.5, np.float32))
    config = TrainConfig.from_flat(optimizer=kind, weight_decay=0.1, momentum=0.0)
    optimizer = optimization.make_optimizer(config, 0.01, model)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    # Zero gradients: Adam's and SGD's own updates are 0, so only the decay moves
    # a weight, by learning_rate * weight_decay * weight.
    optimizer.apply(
        [np.zeros(v.shape, np.float32) for v in model.trainable_variables],
        model.trainable_variables,
    )
    for variable in model.trainable_variables:
        name = variable.path
        decayed = name.endswith("kernel")
        expected = before[name] * (1 - 0.01 * 0.1) if decayed else before[name]
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, err_msg=name)
    assert {v.path.split("/")[-1] for v in model.trainable_variables} == {
        "kernel",
        "bias",
        "gamma",
        "beta",
    }


def test_the_efficientnet_exclusions_are_its_batch_norms_and_biases():
    model = efficientnet.make_model(
        variant="b0", image_size=32, source_size=(32, 32), num_classes=4, weights="none"
    )
    excluded = {id(v) for v in optimization.no_decay_variables(model)}
    for variable in model.weights:
        kind = variable.path.split("/")[-1]
        if kind in ("gamma", "beta", "moving_mean", "moving_variance", "bias"):
            assert id(variable) in excluded, variable.path
        elif kind in ("kernel", "depthwise_kernel"):
            assert id(variable) not in excluded, variable.path
    # B0 has 49 BatchNormalization layers in the base and one in the head.
    batch_norm_gammas = [v for v in model.weights if v.path.endswith("gamma")]
    assert len(batch_norm_gammas) == 50


def test_sgd_takes_its_momentum_and_adam_refuses_weight_decay():
    config = TrainConfig.from_flat(optimizer="sgd", momentum=0.8)
    optimizer = optimization.make_optimizer(config, 0.1, keras.Sequential())
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum == 0.8
    adamw = optimization.make_optimizer(
        TrainConfig.from_flat(optimizer="adamw", weight_decay=0.05), 0.1, keras.Sequential()
    )
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.05


def test_label_smoothing_is_keras_categorical_smoothing_on_sparse_labels():
    labels = np.array([0, 2, 1], np.int32)
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    smoothed = factory.make_loss(3, 0.2)
    reference = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)
    expected = reference(np.eye(3, dtype=np.float32)[labels], probabilities)
    assert float(smoothed(labels, probabilities)) == pytest.approx(float(expected), rel=1e-6)
    # By hand: the target is 1 - 0.2 + 0.2 / 3 on the class and 0.2 / 3 elsewhere.
    target = np.full((3, 3), 0.2 / 3) + np.eye(3)[labels] * 0.8
    by_hand = -(target * np.log(probabilities)).sum(axis=1).mean()
    assert float(smoothed(labels, probabilities)) == pytest.approx(by_hand, rel=1e-5)
    # Labels shaped (N, 1), as Keras hands some losses, give the same loss.
    assert float(smoothed(labels[:, None], probabilities)) == pytest.approx(by_hand, rel=1e-5)
    # No smoothing: Keras' own sparse loss, unchanged.
    assert isinstance(factory.make_loss(3), keras.losses.SparseCategoricalCrossentropy)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_a_compiled_model_traces_its_train_step_once(kind):
    # Keras builds the optimizer lazily inside the first train step when no strategy
    # is set, and TensorFlow traces a function whose first trace made variables a
    # second time: twice the start of every phase (a B0 smoke phase: 12 s, not 6).
    # compile_model builds the optimizer first, so the step is traced once.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    config = TrainConfig.from_flat(optimizer=kind, weight_decay=0.01 if kind == "adamw" else 0)
    optimizer = optimization.make_optimizer(config, 1e-3, model)
    factory.compile_model(model, 1e-3, jit_compile=False, optimizer=optimizer)
    assert model.optimizer.built
    traces, train_step = [], model.train_step
    # Python runs this once per trace, never per step.
    model.train_step = lambda data: traces.append(1) or train_step(data)
    x, y = np.zeros((8, 4), np.float32), np.zeros((8,), np.int32)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(traces) == 1
