"""Train-step throughput: effpipe's step against the notebook's, compute and input apart.

    python -m benchmarks.step_throughput                      # b0, 224 px, batch 32, CPU
    python -m benchmarks.step_throughput --phase=2
    python -m benchmarks.step_throughput --variant=b5 --image_size=456 --batch_size=32 \\
        --mixed_precision --xla=on                          # the GPU headline
    python -m benchmarks.step_throughput --smoke              # a few seconds
    python -m benchmarks.step_throughput --configurations=effpipe/noaug/synthetic

Times the real train step (Keras `fit`, the trainer's model and compile, phase 1:
base frozen; phase 2: --unfreeze_blocks unfrozen) with the trainer's shared
`ThroughputMeter`, in configurations compared like with like:

  effpipe/noaug/synthetic   one fixed uint8 batch repeated: compute only
  effpipe/noaug/pipeline    fed by the trainer's tf.data chain from --dataset
  effpipe/aug/synthetic     as above, with the on-device augmentation
  effpipe/aug/pipeline
  notebook/synthetic        the notebook's model on one fixed float32 batch
  notebook/numpy            the notebook as it ran: model.fit on numpy arrays
  notebook/generator        the notebook fed by its ImageDataGenerator (augmenting)
  effpipe/noaug/feature_cache  phase 1 only (unless --phase1_feature_cache=off): the
                            head trained on the base's pooled features of the same
                            images, computed once (the trainer's feature cache),
                            one train step per compiled call
  effpipe/noaug/feature_cache/multistep  the same with the steps per call the
                            trainer's --steps_per_execution=0 picks for it

--configurations times only the named ones (default: every one), and builds only
the models they train: on a GPU each model costs a compilation, so a run that
needs one figure does not pay for seven.

speedup_vs_notebook pairs effpipe/noaug/synthetic with notebook/synthetic,
effpipe/noaug/pipeline with notebook/numpy and effpipe/aug/pipeline with
notebook/generator. The base gets random weights saved to a file and loaded as a
pretrained base is (the same compute as ImageNet weights, no download). effpipe
uses the trainer's precision, XLA and steps per compiled call (--steps_per_execution,
resolved for an epoch of --steps_per_repeat steps: 1 on a CPU); the replica always
runs float32 without XLA, one step per call, as the notebook did. Each repeat is one epoch of --steps_per_repeat steps per
configuration, interleaved; the first repeat is warm-up; median of the rest.
Prints a table and, last, one JSON line: one object per configuration with
ms_per_step, images_per_sec, peak_memory_mb (GPU; null on CPU) and speedup_vs_notebook,
and, in phase 1, phase1_feature_cache: the wall time of one epoch (--steps_per_repeat
steps) on the full model against one on cached features, the one forward pass that
computes the features of that epoch's images, and the ratio; and the cached epoch's
ms/step at one step per call against the multistep one.
"""

import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from benchmarks import harness, notebook_replica
from effpipe import cli_flags
from effpipe.data import pipeline, sources
from effpipe.errors import UsageError
from effpipe.model import efficientnet, factory, freezing
from effpipe.training import callbacks, feature_cache, runtime

flags.adopt_module_key_flags(cli_flags)
_PHASE = flags.DEFINE_enum("phase", "1", ["1", "2"], "1: base frozen; 2: top blocks unfrozen.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (epochs) per configuration.")
_STEPS_PER_REPEAT = flags.DEFINE_integer("steps_per_repeat", 10, "Train steps per repeat.")
_NOTEBOOK_BASELINE = flags.DEFINE_bool("notebook_baseline", True, "Also time the notebook replica.")
# The flag's earlier name, kept so existing command lines still run.
flags.DEFINE_alias("seed_baseline", "notebook_baseline")
_SMOKE = flags.DEFINE_bool("smoke", False, "Seconds-long run: b0 at 32 px, batch 4.")
_CONFIGURATIONS = flags.DEFINE_list(
    "configurations",
    [],
    "Time only these configurations (names as in the table; default: every one). A "
    "model none of them trains is not built.",
)
# Benchmarks run offline by default; any trainer source works (--dataset=cifar100).
flags.FLAGS.set_default("dataset", "shapes")

# Like-with-like pairs for speedup_vs_notebook.
NOTEBOOK_PAIRS = {
    "effpipe/noaug/synthetic": "notebook/synthetic",
    "effpipe/noaug/pipeline": "notebook/numpy",
    "effpipe/aug/pipeline": "notebook/generator",
}
# Targets of the benchmark (checked here, never in timed tests).
GPU_PHASE1_TARGET_SPEEDUP = 5.0
AUGMENT_MAX_SHARE = 0.15


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


def effpipe_model(
    config, phase: int, weights_path: str, num_classes: int, source_size, setup,
    steps_per_execution: int = 1,
):  # fmt: skip
    """The trainer's model and compile for `phase` (config.augmentation.augment says whether to augment)."""
    model = factory.make_configured_model(config, source_size, num_classes, weights_path)
    if phase == 2:
        freezing.unfreeze_top_blocks(model, config.phases.unfreeze_blocks)
    learning_rate = (
        config.phases.phase1_learning_rate if phase == 1 else config.phases.phase2_learning_rate
    )
    factory.compile_model(
        model, learning_rate, jit_compile=setup.xla, steps_per_execution=steps_per_execution
    )
    return model


def feature_cache_groups(config, setup, train, num_classes, weights_path, steps, cache_build):
    """Phase 1 on cached features: the head model trained on pooled features, one train
    step per compiled call (effpipe/noaug/feature_cache) and as many as the trainer's
    --steps_per_execution=0 picks for it (effpipe/noaug/feature_cache/multistep).

    The first group built computes the features of the epoch's `steps` batches of
    training images once, timed after a warm-up batch, into `cache_build`; both
    configurations then fit a head model on them, fed as the trainer feeds it.
    """
    batch_size, options = config.batch_size, pipeline.pipeline_options_of(config)
    images, labels = train.images[: steps * batch_size], train.labels[: steps * batch_size]
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
            noaug = config.replace(augment=False)
            model = effpipe_model(noaug, 1, weights_path, num_classes, images.shape[1:3], setup)
            head = feature_cache.make_head_model(model)
            factory.compile_model(
                head, config.phases.phase1_learning_rate, jit_compile=setup.xla,
                optimizer=model.optimizer, steps_per_execution=steps_per_execution,
            )  # fmt: skip
            configuration.fit_inputs = {
                "x": pipeline.make_feature_dataset(
                    features_of(model),
                    labels,
                    batch_size=batch_size,
                    is_training=True,
                    seed=config.seed,
                    options=options,
                ),  # fmt: skip
                "steps_per_epoch": steps,
                "shuffle": False,
            }
            return head

        return Group(build, [configuration])

    multistep, _ = runtime.resolve_steps_per_execution(
        config.replace(steps_per_execution=0),
        steps,
        accelerator=setup.accelerator,
        head_only=True,
    )
    cache_build["steps_per_execution"] = multistep
    return [
        group("effpipe/noaug/feature_cache", 1),
        group("effpipe/noaug/feature_cache/multistep", multistep),
    ]


def notebook_model(config, phase: int, num_classes: int, source_size: int) -> keras.Model:
    """The notebook replica for `phase`, float32 whatever effpipe's policy, as it ran."""
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = notebook_replica.make_model(
            config.model.variant, config.model.resolved_image_size, num_classes, source_size
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if phase == 2:
        notebook_replica.unfreeze(model)
    return model


def make_groups(
    config, phase, setup, train, num_classes, weights_path, steps, steps_per_execution,
    cache_build,
) -> list[Group]:  # fmt: skip
    """Every configuration, grouped by the model it trains; effpipe's full models run
    `steps_per_execution` train steps per compiled call, as the trainer would."""
    batch_size = config.batch_size
    source_size = train.images.shape[1:3]
    images, labels = train.images[:batch_size], train.labels[:batch_size].astype(np.int32)
    synthetic = tf.data.Dataset.from_tensors((images, labels)).repeat()
    pipeline_dataset = pipeline.make_dataset(
        train.images,
        train.labels,
        batch_size=batch_size,
        is_training=True,
        seed=config.seed,
        options=pipeline.pipeline_options_of(config),
    ).repeat()
    groups = []
    for augment in (False, True):
        tag = "aug" if augment else "noaug"
        variant_config = config.replace(augment=augment)
        groups.append(
            Group(
                functools.partial(
                    effpipe_model,
                    variant_config,
                    phase,
                    weights_path,
                    num_classes,
                    source_size,
                    setup,
                    steps_per_execution,
                ),  # fmt: skip
                [
                    Configuration(
                        f"effpipe/{tag}/{feed}",
                        {"x": dataset, "steps_per_epoch": steps, "shuffle": False},
                    )
                    for feed, dataset in (("synthetic", synthetic), ("pipeline", pipeline_dataset))
                ],
            )
        )
    # Phase 1 on cached features, unless turned off (the benchmark's base loads a
    # weights file, as a pretrained one: its features do not change between epochs).
    if phase == 1 and config.phases.phase1_feature_cache != "off" and config.model.head == "pooled":
        groups.extend(
            feature_cache_groups(
                config, setup, train, num_classes, weights_path, steps, cache_build
            )
        )
    if not _NOTEBOOK_BASELINE.value:
        return select_configurations(groups, _CONFIGURATIONS.value)
    one_hot = notebook_replica.one_hot(train.labels, num_classes)
    examples = steps * batch_size
    float_batch = tf.data.Dataset.from_tensors(
        (images.astype(np.float32), one_hot[:batch_size])
    ).repeat()
    flow = notebook_replica.make_image_generator().flow(
        train.images, one_hot, batch_size=batch_size, seed=config.seed
    )
    groups.append(
        Group(
            functools.partial(notebook_model, config, phase, num_classes, source_size[0]),
            [
                Configuration(
                    "notebook/synthetic",
                    {"x": float_batch, "steps_per_epoch": steps, "shuffle": False},
                ),
                # As the notebook ran: fit on numpy arrays (Keras shuffles them).
                Configuration(
                    "notebook/numpy",
                    {
                        "x": train.images[:examples],
                        "y": one_hot[:examples],
                        "batch_size": batch_size,
                    },
                ),
                Configuration("notebook/generator", {"x": flow, "steps_per_epoch": steps}),
            ],
        )
    )
    return select_configurations(groups, _CONFIGURATIONS.value)


def select_configurations(groups: list[Group], names: list[str]) -> list[Group]:
    """The groups with only the configurations in `names` (all when empty); a group
    left with none is dropped, so its model is never built.

    Raises:
      UsageError: a name this run does not have, or the feature cache without the
        configuration its epoch is compared with.
    """
    if not names:
        return groups
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


def run_repeat(model: keras.Model, configuration: Configuration, batch_size: int, gpu: bool):
    """One epoch of `fit`, timed by the trainer's ThroughputMeter."""
    meter = callbacks.ThroughputMeter(batch_size, log_every_epoch=False)
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    model.fit(**configuration.fit_inputs, epochs=1, callbacks=[meter], verbose=0)
    configuration.records.append(meter.records[-1])
    if gpu:
        peak_mb = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        configuration.peak_memory_mb = max(configuration.peak_memory_mb or 0.0, peak_mb)


def run_groups(groups: list[Group], repeats: int, batch_size: int, gpu: bool) -> None:
    """Warm-up plus `repeats` epochs per configuration.

    On a GPU each group runs alone and its model is freed before the next, so peak
    memory is one model's and an 8 GB card never holds two B5s. On a CPU (no memory
    figure) all groups are built first and their repeats interleaved, so the shared
    cores' drift slows every configuration alike.
    """
    batches = [[group] for group in groups] if gpu else [groups]
    for batch in batches:
        for group in batch:
            group.model = group.build_model()
        for _ in range(1 + repeats):
            for group in batch:
                for configuration in group.configurations:
                    run_repeat(group.model, configuration, batch_size, gpu)
        for group in batch:
            group.model = None
        if gpu:
            keras.backend.clear_session(free_memory=True)


def main(argv):
    del argv
    config = cli_flags.config_from_flags()
    phase, repeats, steps = int(_PHASE.value), _REPEATS.value, _STEPS_PER_REPEAT.value
    harness.require_positive(repeats=repeats, steps_per_repeat=steps)
    if _SMOKE.value:
        config = dataclasses.replace(
            config, variant="b0", image_size=32, batch_size=4, shapes_train_examples=40,
            shapes_test_examples=4, unfreeze_blocks=2,
        )  # fmt: skip
        repeats, steps = 1, 3
    setup = runtime.resolve_runtime(
        mixed_precision=config.runtime.mixed_precision,
        mixed_precision_dtype=config.runtime.mixed_precision_dtype,
        xla=config.runtime.xla,
    )
    gpu = setup.accelerator == "gpu"
    # The trainer's steps per compiled call for an epoch of `steps` steps (a repeat).
    steps_per_execution, steps_per_execution_reason = runtime.resolve_steps_per_execution(
        config, steps, accelerator=setup.accelerator
    )
    keras.utils.set_random_seed(config.seed)
    source = sources.load_configured_source(config)
    print(
        f"step_throughput on {setup.device}: {config.model.variant} at {config.model.resolved_image_size} "
        f"px, batch {config.batch_size}, phase {phase} (effpipe unfreezes "
        f"{config.phases.unfreeze_blocks} blocks, the replica its last 51 layers); effpipe "
        f"{setup.precision}, XLA {'on' if setup.xla else 'off'}; notebook replica float32, no "
        f"XLA; median of {repeats} repeats x {steps} steps after one warm-up repeat; "
        f"effpipe's {steps_per_execution_reason}"
    )

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(setup.precision)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # Random base weights loaded from a file take the pretrained-base path.
            weights_path = os.path.join(scratch, "base.weights.h5")
            efficientnet.make_base(
                config.model.variant, config.model.resolved_image_size, "none"
            ).save_weights(weights_path)
            cache_build = {}
            groups = make_groups(
                config, phase, setup, source.train, source.num_classes, weights_path, steps,
                steps_per_execution, cache_build,
            )  # fmt: skip
            run_groups(groups, repeats, config.batch_size, gpu)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    configurations = [c for group in groups for c in group.configurations]
    report = summarize(configurations)
    feature_cache_report = summarize_feature_cache(report, cache_build)
    print_report(report, setup, feature_cache_report)
    harness.print_json_line(
        {
            "benchmark": "step_throughput",
            "device": setup.device,
            "variant": config.model.variant,
            "image_size": config.model.resolved_image_size,
            "batch_size": config.batch_size,
            "phase": phase,
            "unfreeze_blocks": config.phases.unfreeze_blocks,
            "precision": setup.precision,
            "xla": setup.xla,
            "repeats": repeats,
            "steps_per_repeat": steps,
            "steps_per_execution": steps_per_execution,
            "configurations": report,
            "targets": targets(report, setup),
            "phase1_feature_cache": feature_cache_report,
        }
    )


def summarize(configurations: list[Configuration]) -> dict[str, dict]:
    """Median figures per configuration (warm-up repeat dropped) and the ratios to the notebook."""
    report = {}
    for configuration in configurations:
        timed = configuration.records[1:]
        ms_per_step = statistics.median(record["ms_per_step"] for record in timed)
        report[configuration.name] = {
            "seconds_per_repeat": statistics.median(record["seconds"] for record in timed),
            "steps_per_repeat": timed[0]["steps"],
            "ms_per_step": ms_per_step,
            "images_per_sec": statistics.median(record["images_per_sec"] for record in timed),
            "peak_memory_mb": configuration.peak_memory_mb,
            "speedup_vs_notebook": None,
        }
    for name, notebook_name in NOTEBOOK_PAIRS.items():
        if name in report and notebook_name in report:
            report[name]["speedup_vs_notebook"] = (
                report[notebook_name]["ms_per_step"] / report[name]["ms_per_step"]
            )
    for tag in ("effpipe/noaug", "effpipe/aug", "notebook"):
        compute = report.get(f"{tag}/synthetic")
        for feed in ("pipeline", "numpy", "generator"):
            fed = report.get(f"{tag}/{feed}")
            if compute and fed:
                # The share of a fed step not explained by compute: waiting for input.
                fed["input_bound_fraction"] = max(
                    0.0, 1.0 - compute["ms_per_step"] / fed["ms_per_step"]
                )
    return report


def summarize_feature_cache(report: dict, cache_build: dict) -> dict | None:
    """Phase-1 wall time per epoch on the full model and on cached features.

    An epoch here is one repeat (--steps_per_repeat steps); the uncached epoch is
    effpipe/noaug/pipeline, the same model fed by the trainer's pipeline. Over E
    epochs the cache costs one forward pass plus E cached epochs.
    """
    cached = report.get("effpipe/noaug/feature_cache")
    if cached is None:
        return None
    without = report["effpipe/noaug/pipeline"]["seconds_per_repeat"]
    with_cache = cached["seconds_per_repeat"]
    multistep = report.get("effpipe/noaug/feature_cache/multistep")
    return {
        "epoch_seconds_without_cache": without,
        "epoch_seconds_with_cache": with_cache,
        "epoch_time_ratio": with_cache / without,
        "ms_per_step_with_cache": 1000.0 * with_cache / cached["steps_per_repeat"],
        "steps_per_execution": cache_build["steps_per_execution"],
        "ms_per_step_with_cache_multistep": (
            1000.0 * multistep["seconds_per_repeat"] / multistep["steps_per_repeat"]
            if multistep
            else None
        ),
        "cache_build_seconds": cache_build["seconds"],
        "cache_build_images": cache_build["images"],
        "ten_epochs_seconds_without_cache": 10 * without,
        "ten_epochs_seconds_with_cache": cache_build["seconds"] + 10 * with_cache,
    }


def targets(report: dict, setup) -> dict:
    """The issue's targets that this run's configurations measure."""
    checks = {}
    noaug, aug = report.get("effpipe/noaug/synthetic"), report.get("effpipe/aug/synthetic")
    if noaug and aug:
        augment_share = max(0.0, 1.0 - noaug["ms_per_step"] / aug["ms_per_step"])
        checks["augment_share_of_step"] = {
            "value": augment_share,
            "limit": AUGMENT_MAX_SHARE,
            "met": augment_share < AUGMENT_MAX_SHARE,
        }
    speedup = report.get("effpipe/noaug/pipeline", {}).get("speedup_vs_notebook")
    if speedup is not None:
        needed = GPU_PHASE1_TARGET_SPEEDUP if setup.accelerator == "gpu" else 1.0
        checks["noaug_speedup_vs_notebook_as_run"] = {
            "value": speedup,
            "limit": needed,
            "met": speedup >= needed,
        }
    return checks


def _percent(fraction):
    return None if fraction is None else 100.0 * fraction


def print_report(report: dict, setup, feature_cache_report: dict | None = None) -> None:
    rows = [
        [
            name,
            figures["ms_per_step"],
            figures["images_per_sec"],
            _percent(figures.get("input_bound_fraction")),
            figures["peak_memory_mb"],
            figures["speedup_vs_notebook"],
        ]
        for name, figures in report.items()
    ]
    harness.print_table(
        ["configuration", "ms/step", "images/s", "input-bound %", "peak MB", "x notebook"], rows
    )
    for name, check in targets(report, setup).items():
        print(
            f"target {name}: {check['value']:.3f} against {check['limit']:g}: "
            f"{'met' if check['met'] else 'MISSED'}"
        )
    if feature_cache_report:
        figures = feature_cache_report
        print(
            f"phase-1 epoch: {figures['epoch_seconds_without_cache']:.3f} s on the full model, "
            f"{figures['epoch_seconds_with_cache']:.3f} s on cached features "
            f"({figures['epoch_time_ratio']:.4f}x); computing the features of its "
            f"{figures['cache_build_images']} images once: {figures['cache_build_seconds']:.3f} s; "
            f"10 epochs: {figures['ten_epochs_seconds_without_cache']:.1f} s against "
            f"{figures['ten_epochs_seconds_with_cache']:.1f} s"
        )
        if figures["ms_per_step_with_cache_multistep"] is not None:
            print(
                f"phase-1 step on cached features: {figures['ms_per_step_with_cache']:.3f} ms "
                f"at 1 step per call, {figures['ms_per_step_with_cache_multistep']:.3f} ms at "
                f"{figures['steps_per_execution']} (--steps_per_execution=0)"
            )


if __name__ == "__main__":
    harness.run_main("benchmarks.step_throughput", main)
