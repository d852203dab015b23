"""The step benchmark's configurations: which model each trains and how each feeds it.

Used by `benchmarks.step_throughput`, which times them; reads no flags. Every
configuration belongs to a `Group`, the configurations that share one model: a
group's model is built only when one of its configurations is selected, since on a
GPU each model costs a compilation. The names are the table's rows:
effpipe/{noaug,aug}/{synthetic,pipeline}, effpipe/noaug/feature_cache[/multistep]
and notebook/{synthetic,numpy,generator}.
"""

import dataclasses
import functools
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from benchmarks import harness, keras_recipe, notebook_replica
from effpipe.config import POOLING_HEADS, TrainConfig
from effpipe.data import pipeline
from effpipe.data.splits import Split
from effpipe.errors import UsageError
from effpipe.model import factory, freezing
from effpipe.training import feature_cache, runtime


@dataclasses.dataclass
class Configuration:
    """One timed configuration: how one repeat feeds its group's model."""

    name: str
    fit_inputs: dict
    records: list = dataclasses.field(default_factory=list)
    peak_memory_mb: float | None = None


@dataclasses.dataclass
class Group:
    """Configurations that share one model, and how to build that model."""

    build_model: Callable[[], keras.Model]
    configurations: list[Configuration]
    model: keras.Model | None = None


@dataclasses.dataclass(frozen=True)
class StepSetting:
    """What every configuration of one run shares.

    Attributes:
      config: the run's TrainConfig.
      phase: 1 (base frozen) or 2 (top blocks unfrozen).
      setup: the run's resolved runtime (precision, XLA, accelerator).
      train: the training split (uint8 images, integer labels).
      num_classes: outputs of the classifier.
      weights_path: the base's weights file, loaded as a pretrained base is.
      steps: train steps per repeat (one epoch).
      steps_per_execution: effpipe's full models' train steps per compiled call.
    """

    config: TrainConfig
    phase: int
    setup: runtime.Runtime
    train: Split
    num_classes: int
    weights_path: str
    steps: int
    steps_per_execution: int = 1

    @property
    def source_size(self) -> tuple[int, int]:
        return self.train.images.shape[1:3]


def effpipe_network(setting: StepSetting, config) -> keras.Model:
    """The trainer's model for the setting's phase, uncompiled: base frozen, or its top
    --unfreeze_blocks blocks unfrozen in phase 2; `config` (the setting's, with or
    without augmentation) says whether to augment."""
    model = factory.make_configured_model(
        config.model,
        config.augmentation,
        setting.source_size,
        setting.num_classes,
        seed=config.seed,
        compile_augmentation=not config.runtime.debug_numerics,
        weights=setting.weights_path,
    )
    if setting.phase == 2:
        freezing.unfreeze_top_blocks(model, config.phases.unfreeze_blocks)
    return model


def compile_step(setting: StepSetting, model: keras.Model, steps_per_execution: int) -> None:
    """The trainer's compile for the setting's phase: Adam at the phase's learning rate,
    the run's XLA switch."""
    phases = setting.config.phases
    learning_rate = (
        phases.phase1_learning_rate if setting.phase == 1 else phases.phase2_learning_rate
    )
    factory.compile_model(
        model,
        learning_rate,
        jit_compile=setting.setup.xla,
        steps_per_execution=steps_per_execution,
    )


def effpipe_model(setting: StepSetting, config, steps_per_execution: int) -> keras.Model:
    """The trainer's model and compile for the setting's phase; `config` (the setting's,
    with or without augmentation) says whether to augment."""
    model = effpipe_network(setting, config)
    compile_step(setting, model, steps_per_execution)
    return model


def effpipe_groups(setting: StepSetting) -> list[Group]:
    """effpipe's full model, without and with augmentation, each on one fixed batch
    (compute only) and fed by the trainer's pipeline."""
    config, train, steps = setting.config, setting.train, setting.steps
    batch_size = config.batch_size
    images, labels = train.images[:batch_size], train.labels[:batch_size].astype(np.int32)
    synthetic = tf.data.Dataset.from_tensors((images, labels)).repeat()
    pipeline_dataset = pipeline.make_dataset(
        train.images,
        train.labels,
        batch_size=batch_size,
        is_training=True,
        seed=config.seed,
        options=pipeline.pipeline_options_of(config.runtime),
    ).repeat()
    groups = []
    for augment in (False, True):
        tag = "aug" if augment else "noaug"
        build = functools.partial(
            effpipe_model, setting, config.replace(augment=augment), setting.steps_per_execution
        )
        configurations = [
            Configuration(
                f"effpipe/{tag}/{feed}", {"x": dataset, "steps_per_epoch": steps, "shuffle": False}
            )
            for feed, dataset in (("synthetic", synthetic), ("pipeline", pipeline_dataset))
        ]
        groups.append(Group(build, configurations))
    return groups


def feature_cache_groups(setting: StepSetting, cache_build: dict) -> list[Group]:
    """Phase 1 on cached features: the head model trained on pooled features, one train
    step per compiled call (effpipe/noaug/feature_cache) and as many as the trainer's
    --steps_per_execution=0 picks for it (effpipe/noaug/feature_cache/multistep).

    The first group built computes the features of the epoch's `steps` batches of
    training images once, timed after a warm-up batch, into `cache_build`; both
    configurations then fit a head model on them, fed as the trainer feeds it.
    """
    config, setup, steps = setting.config, setting.setup, setting.steps
    batch_size, options = config.batch_size, pipeline.pipeline_options_of(config.runtime)
    examples = steps * batch_size
    images, labels = setting.train.images[:examples], setting.train.labels[:examples]
    computed = {}

    def features_of(model):
        if "features" not in computed:
            feature_model = feature_cache.make_feature_model(model)
            feature_model.compile(jit_compile=setup.xla)
            batches = pipeline.make_dataset(
                images, labels, batch_size=batch_size, is_training=False, options=options
            )
            feature_model.predict(batches.take(1), verbose=0)  # Tracing, not timed.
            start = time.perf_counter()
            computed["features"] = feature_model.predict(batches, verbose=0).astype(np.float32)
            cache_build.update(seconds=time.perf_counter() - start, images=len(images))
        return computed["features"]

    def group(name, steps_per_execution):
        configuration = Configuration(name, {})

        def build():
            model = effpipe_model(setting, config.replace(augment=False), 1)
            head = feature_cache.make_head_model(model)
            factory.compile_model(
                head, config.phases.phase1_learning_rate, jit_compile=setup.xla,
                optimizer=model.optimizer, steps_per_execution=steps_per_execution,
            )  # fmt: skip
            features = pipeline.make_feature_dataset(
                features_of(model), labels, batch_size=batch_size, is_training=True,
                seed=config.seed, options=options,
            )  # fmt: skip
            configuration.fit_inputs = {"x": features, "steps_per_epoch": steps, "shuffle": False}
            return head

        return Group(build, [configuration])

    multistep, _ = runtime.resolve_steps_per_execution(
        config.replace(steps_per_execution=0), steps, accelerator=setup.accelerator,
        head_only=True,
    )  # fmt: skip
    cache_build["steps_per_execution"] = multistep
    return [
        group("effpipe/noaug/feature_cache", 1),
        group("effpipe/noaug/feature_cache/multistep", multistep),
    ]


def notebook_model(setting: StepSetting) -> keras.Model:
    """The notebook replica for the setting's phase, float32 whatever effpipe's policy,
    as it ran."""
    config = setting.config
    with harness.precision_policy("float32"):
        model = notebook_replica.make_model(
            config.model.variant,
            config.model.resolved_image_size,
            setting.num_classes,
            setting.source_size[0],
        )
    if setting.phase == 2:
        notebook_replica.unfreeze(model)
    return model


def notebook_group(setting: StepSetting) -> Group:
    """The notebook replica on one fixed float32 batch, on numpy arrays as the notebook
    ran, and fed by its ImageDataGenerator."""
    config, train, steps = setting.config, setting.train, setting.steps
    batch_size, examples = config.batch_size, steps * config.batch_size
    one_hot = notebook_replica.one_hot(train.labels, setting.num_classes)
    float_batch = tf.data.Dataset.from_tensors(
        (train.images[:batch_size].astype(np.float32), one_hot[:batch_size])
    ).repeat()
    flow = notebook_replica.make_image_generator().flow(
        train.images, one_hot, batch_size=batch_size, seed=config.seed
    )
    synthetic_inputs = {"x": float_batch, "steps_per_epoch": steps, "shuffle": False}
    # As the notebook ran: fit on numpy arrays (Keras shuffles them).
    numpy_inputs = {
        "x": train.images[:examples],
        "y": one_hot[:examples],
        "batch_size": batch_size,
    }
    return Group(
        functools.partial(notebook_model, setting),
        [
            Configuration("notebook/synthetic", synthetic_inputs),
            Configuration("notebook/numpy", numpy_inputs),
            Configuration("notebook/generator", {"x": flow, "steps_per_epoch": steps}),
        ],
    )


def keras_recipe_group(setting: StepSetting) -> Group:
    """The keras_recipe peer (benchmarks.keras_recipe): effpipe's network from the base
    on, fed augmented, resized batches by a tf.data chain on the host, compiled as
    effpipe's step (the run's precision, XLA switch and steps per compiled call).

    Its dataset is made when its model is, under the run's dtype policy, so that Keras'
    layers in it compute in the policy's dtype as a user's script would.
    """
    config, steps = setting.config, setting.steps
    configuration = Configuration("keras_recipe", {})

    def build():
        model = keras_recipe.make_model(effpipe_network(setting, config.replace(augment=False)))
        compile_step(setting, model, setting.steps_per_execution)
        if setting.setup.xla and not model.jit_compile:
            # Keras turns XLA off, with a warning only, for a layer it cannot compile.
            raise RuntimeError("keras_recipe: Keras compiled its step without XLA")
        dataset = keras_recipe.make_dataset(
            setting.train.images, setting.train.labels, batch_size=config.batch_size,
            image_size=config.model.resolved_image_size, augmentation=config.augmentation,
            seed=config.seed,
        )  # fmt: skip
        configuration.fit_inputs = {"x": dataset, "steps_per_epoch": steps, "shuffle": False}
        return model

    return Group(build, [configuration])


def make_groups(
    setting: StepSetting, cache_build: dict, *, notebook_baseline: bool, names: list[str]
) -> list[Group]:
    """Every configuration of the run, grouped by the model it trains.

    Args:
      setting: what the configurations share.
      cache_build: filled with the feature cache's build time when it is built.
      notebook_baseline: whether to include the notebook replica's configurations.
      names: time only these configurations (all when empty).

    Returns:
      The groups left with at least one selected configuration.

    Raises:
      UsageError: see `select_configurations`.
    """
    config = setting.config
    groups = effpipe_groups(setting)
    # Phase 1 on cached features, unless turned off (the benchmark's base loads a
    # weights file, as a pretrained one: its features do not change between epochs).
    phases, head = config.phases, config.model.head
    if setting.phase == 1 and phases.phase1_feature_cache != "off" and head in POOLING_HEADS:
        groups.extend(feature_cache_groups(setting, cache_build))
    if notebook_baseline:
        groups.append(notebook_group(setting))
    groups.append(keras_recipe_group(setting))
    return select_configurations(groups, names)


def select_configurations(groups: list[Group], names: list[str]) -> list[Group]:
    """The groups with only the configurations in `names` (all when empty); a group
    left with none is dropped, so its model is never built.

    Raises:
      UsageError: a name this run does not have, or the feature cache without the
        configuration its epoch is compared with.
    """
    if not names:
        return groups
    # The notebook's configurations were first named seed/...: old command lines run.
    names = ["notebook/" + n.removeprefix("seed/") if n.startswith("seed/") else n for n in names]
    available = [c.name for group in groups for c in group.configurations]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise UsageError(
            f"--configurations={','.join(names)}: {', '.join(unknown)} not in this run; "
            f"choose from {','.join(available)}"
        )
    if "effpipe/noaug/feature_cache" in names and "effpipe/noaug/pipeline" not in names:
        raise UsageError(
            "--configurations: effpipe/noaug/feature_cache is compared with "
            "effpipe/noaug/pipeline: name both"
        )
    selected = []
    for group in groups:
        group.configurations = [c for c in group.configurations if c.name in names]
        if group.configurations:
            selected.append(group)
    return selected
