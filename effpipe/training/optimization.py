"""Each phase's learning-rate schedule and optimizer, from the phases slice.

Every phase runs its own schedule over its own steps, counted by its optimizer's
`iterations`: phase 2 compiles a new optimizer, so its schedule starts again, and a
resumed run restores `iterations` with the optimizer's variables, so its schedule
continues exactly where the killed run stood. The schedules are Keras' own
(`keras.optimizers.schedules`): CosineDecay with its warm-up, ExponentialDecay, and
`LinearWarmup` only where Keras has no warm-up of its own (before a constant or an
exponential rate).

    constant     lr                                     (the notebook's)
    cosine       0 -> lr over the warm-up, then cosine down to lr_min_fraction * lr
    exponential  0 -> lr over the warm-up, then lr * decay_rate ** floor(t / decay_steps)
"""

import keras

from effpipe.config import TrainConfig


@keras.saving.register_keras_serializable(package="effpipe")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly from 0 to `target` over `warmup_steps`, then follows `after`.

    Keras' CosineDecay has a warm-up of its own; constant and exponential rates do
    not, so this puts the same linear ramp in front of them. `after` sees the steps
    counted from the end of the warm-up.

    Args:
      target: the rate at the end of the warm-up.
      warmup_steps: steps of the ramp (positive).
      after: the rate afterwards: a float or a schedule.
    """

    def __init__(self, target: float, warmup_steps: int, after):
        super().__init__()
        self.target = target
        self.warmup_steps = warmup_steps
        self.after = after

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        ramp = self.target * step / self.warmup_steps
        if isinstance(self.after, keras.optimizers.schedules.LearningRateSchedule):
            later = self.after(keras.ops.maximum(step - self.warmup_steps, 0.0))
        else:
            later = keras.ops.convert_to_tensor(self.after, "float32")
        return keras.ops.where(step < self.warmup_steps, ramp, later)

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.saving.serialize_keras_object(after)
        return {"target": self.target, "warmup_steps": self.warmup_steps, "after": after}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.saving.deserialize_keras_object(after)
        return cls(config["target"], config["warmup_steps"], after)


def make_learning_rate(config: TrainConfig, phase: int, steps_per_epoch: int):
    """Phase `phase`'s learning rate: a float (constant, no warm-up) or a schedule.

    Args:
      config: the run configuration (its phases slice and the batch-size scaling).
      phase: 1 or 2.
      steps_per_epoch: training steps per epoch; the schedule runs over the phase's
        epochs times this.

    Returns:
      A float or a `keras.optimizers.schedules.LearningRateSchedule` of the step.
    """
    recipe = config.phases
    rate = config.learning_rate(phase)
    total_steps = max(1, getattr(recipe, f"phase{phase}_epochs") * steps_per_epoch)
    warmup_steps = min(round(recipe.warmup_epochs * steps_per_epoch), total_steps - 1)
    if recipe.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else rate,
            decay_steps=total_steps - warmup_steps,
            alpha=recipe.lr_min_fraction,
            warmup_target=rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    if recipe.lr_schedule == "exponential":
        after = keras.optimizers.schedules.ExponentialDecay(
            rate,
            decay_steps=max(1, round(recipe.lr_decay_epochs * steps_per_epoch)),
            decay_rate=recipe.lr_decay_rate,
            staircase=True,
        )
    else:
        after = rate
    return LinearWarmup(rate, warmup_steps, after) if warmup_steps else after


def rate_at(learning_rate, step: int) -> float:
    """The rate `make_learning_rate`'s result gives the update of step `step` (0-based)."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(learning_rate(step)))
    return float(learning_rate)


def make_optimizer(config: TrainConfig, learning_rate, model: keras.Model):
    """A new optimizer of the run's kind, with its weight decay on kernels only.

    Args:
      config: the run configuration (optimizer, momentum, weight decay).
      learning_rate: the phase's rate or schedule (`make_learning_rate`).
      model: the full model, whose BatchNormalization and bias variables are
        excluded from the weight decay, as the published EfficientNet recipes do.

    Returns:
      An unbuilt Keras optimizer (compile wraps it in a LossScaleOptimizer under
      mixed_float16).
    """
    recipe = config.phases
    weight_decay = recipe.weight_decay or None
    if recipe.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=recipe.momentum, weight_decay=weight_decay
        )
    else:
        optimizer = keras.optimizers.Adam(learning_rate)
    if recipe.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    return optimizer


def no_decay_variables(model: keras.Model) -> list:
    """The variables weight decay leaves alone: every BatchNormalization layer's and
    every bias, in `model` and the models nested in it."""
    excluded, layers = [], list(model.layers)
    while layers:
        layer = layers.pop()
        if isinstance(layer, keras.Model):
            layers.extend(layer.layers)
        elif isinstance(layer, keras.layers.BatchNormalization):
            excluded.extend(layer.weights)
        elif getattr(layer, "bias", None) is not None:
            excluded.append(layer.bias)
    return excluded


def describe(config: TrainConfig, phase: int) -> str:
    """The phase's optimizer and schedule in words, for the log."""
    recipe = config.phases
    words = f"{recipe.optimizer} at {config.learning_rate(phase):g}, {recipe.lr_schedule}"
    if recipe.lr_schedule == "cosine":
        words += f" to {recipe.lr_min_fraction:g} of it"
    elif recipe.lr_schedule == "exponential":
        words += f" (x{recipe.lr_decay_rate:g} every {recipe.lr_decay_epochs:g} epochs)"
    if recipe.warmup_epochs:
        words += f", {recipe.warmup_epochs:g} warm-up epochs"
    if recipe.weight_decay:
        words += f", weight decay {recipe.weight_decay:g}"
    if recipe.optimizer == "sgd":
        words += f", momentum {recipe.momentum:g}"
    if recipe.label_smoothing:
        words += f", label smoothing {recipe.label_smoothing:g}"
    return words
