"""Train-step throughput: effpipe's step against the notebook's and a Keras user's
of today, compute and input apart.

    python -m benchmarks.step_throughput                      # b0, 224 px, batch 32, CPU
    python -m benchmarks.step_throughput --phase=2
    python -m benchmarks.step_throughput --variant=b5 --image_size=456 --batch_size=32 \\
        --mixed_precision --xla=on                          # the GPU headline
    python -m benchmarks.step_throughput --smoke              # a few seconds
    python -m benchmarks.step_throughput --results_dir=results  # also results/<name>.json
    python -m benchmarks.step_throughput --configurations=effpipe/noaug/synthetic
    python -m benchmarks.step_throughput --mixed_precision \\
        --configurations=effpipe/aug/pipeline,keras_recipe   # against the peer, bfloat16

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
  keras_recipe              the peer: what the keras-io fine-tuning guide has a user
                            write today (benchmarks.keras_recipe): effpipe's network
                            from the base on, fed by a host tf.data chain that maps
                            Keras' RandomRotation/Translation/Zoom/Flip and Resizing
                            over batches with num_parallel_calls, then prefetches

--configurations times only the named ones (default: every one), and builds only
the models they train: on a GPU each model costs a compilation, so a run that
needs one figure does not pay for every model.

speedup_vs_notebook pairs effpipe/noaug/synthetic with notebook/synthetic,
effpipe/noaug/pipeline with notebook/numpy and effpipe/aug/pipeline with
notebook/generator; speedup_vs_keras_recipe pairs effpipe/aug/pipeline with
keras_recipe (both fed from the same uint8 images, both augmenting: effpipe on the
device inside its step, the peer on the host). The base gets random weights saved
to a file and loaded as a pretrained base is (the same compute as ImageNet weights,
no download). effpipe uses the trainer's precision, XLA and steps per compiled call
(--steps_per_execution, resolved for an epoch of --steps_per_repeat steps: 1 on a
CPU); the replica always runs float32 without XLA, one step per call, as the
notebook did. keras_recipe takes effpipe's precision, XLA switch and steps per
call: the guide's mixed precision is --mixed_precision here (bfloat16 on a CPU,
float16 on a GPU) and its jit_compile=True is --xla (auto: on on a GPU, off on a
CPU, where a compiled step measured 8x slower), so that the ratio compares input
paths and steps, not settings. Each repeat is one epoch of --steps_per_repeat steps
per configuration, interleaved; the first repeat is warm-up; median of the rest.
Prints a table and, last, one JSON line: one object per configuration with
ms_per_step, images_per_sec, peak_memory_mb (GPU; null on CPU), speedup_vs_notebook
and speedup_vs_keras_recipe; the targets; and, in phase 1, phase1_feature_cache: the
wall time of one epoch (--steps_per_repeat steps) on the full model against one on
cached features, the one forward pass that computes the features of that epoch's
images, and the ratio; and the cached epoch's ms/step at one step per call against
the multistep one. --seed_baseline is the old name of --notebook_baseline and still
works.

The configurations live in benchmarks.step_configurations, the report in
benchmarks.step_report.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf
from absl import flags

from benchmarks import harness, records, step_report
from benchmarks.step_configurations import Configuration, Group, StepSetting, make_groups
from effpipe import cli_flags
from effpipe.data import sources
from effpipe.model import efficientnet
from effpipe.training import callbacks, runtime

flags.adopt_module_key_flags(cli_flags)
flags.adopt_module_key_flags(records)
_PHASE = flags.DEFINE_enum("phase", "1", ["1", "2"], "1: base frozen; 2: top blocks unfrozen.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (epochs) per configuration.")
_STEPS_PER_REPEAT = flags.DEFINE_integer("steps_per_repeat", 10, "Train steps per repeat.")
_NOTEBOOK_BASELINE = flags.DEFINE_bool("notebook_baseline", True, "Also time the notebook replica.")
# The flag's earlier name, kept so existing command lines still run.
flags.DEFINE_alias("seed_baseline", "notebook_baseline")
_SMOKE = flags.DEFINE_bool("smoke", False, "Seconds-long run: b0 at 32 px, batch 4.")
_MEMORY_CAP_MIB = flags.DEFINE_integer(
    "memory_cap_mib",
    0,
    "On a GPU, cap TensorFlow's allocator at this many MiB, as the "
    "batch-size tuner's trials do (a step that needs more fails out of memory); 0: no cap.",
)
_CONFIGURATIONS = flags.DEFINE_list(
    "configurations",
    [],
    "Time only these configurations (names as in the table; default: every one). A "
    "model none of them trains is not built.",
)
# Benchmarks run offline by default; any trainer source works (--dataset=cifar100).
flags.FLAGS.set_default("dataset", "shapes")


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
    if _MEMORY_CAP_MIB.value:
        runtime.cap_gpu_memory(_MEMORY_CAP_MIB.value)
    config = cli_flags.config_from_flags()
    phase, repeats, steps = int(_PHASE.value), _REPEATS.value, _STEPS_PER_REPEAT.value
    harness.require_positive(repeats=repeats, steps_per_repeat=steps)
    if _SMOKE.value:
        config = config.replace(
            variant="b0", image_size=32, batch_size=4, shapes_train_examples=40,
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
    source = sources.load_configured_source(
        config.data,
        size=config.source_size,
        seed=config.seed,
        cache_root=harness.cache_root(config),
    )
    model = config.model
    print(
        f"step_throughput on {setup.device}: {model.variant} at {model.resolved_image_size} "
        f"px, batch {config.batch_size}, phase {phase} (effpipe unfreezes "
        f"{config.phases.unfreeze_blocks} blocks, the replica its last 51 layers); effpipe "
        f"{setup.precision}, XLA {'on' if setup.xla else 'off'}, and so keras_recipe; notebook "
        f"replica float32, no XLA; median of {repeats} repeats x {steps} steps after one warm-up repeat; "
        f"effpipe's {steps_per_execution_reason}"
    )

    cache_build = {}
    with harness.precision_policy(setup.precision), tempfile.TemporaryDirectory() as scratch:
        # Random base weights loaded from a file take the pretrained-base path.
        weights_path = os.path.join(scratch, "base.weights.h5")
        base = efficientnet.make_base(model.variant, model.resolved_image_size, "none")
        base.save_weights(weights_path)
        setting = StepSetting(
            config, phase, setup, source.train, source.num_classes, weights_path, steps,
            steps_per_execution,
        )  # fmt: skip
        groups = make_groups(
            setting,
            cache_build,
            notebook_baseline=_NOTEBOOK_BASELINE.value,
            names=_CONFIGURATIONS.value,
        )
        run_groups(groups, repeats, config.batch_size, gpu)

    report = step_report.summarize([c for group in groups for c in group.configurations])
    feature_cache_report = step_report.summarize_feature_cache(report, cache_build)
    step_report.print_report(report, setup, feature_cache_report)
    payload = {
        "benchmark": "step_throughput",
        "device": setup.device,
        "variant": model.variant,
        "image_size": model.resolved_image_size,
        "batch_size": config.batch_size,
        "phase": phase,
        "unfreeze_blocks": config.phases.unfreeze_blocks,
        "precision": setup.precision,
        "xla": setup.xla,
        "repeats": repeats,
        "steps_per_repeat": steps,
        "steps_per_execution": steps_per_execution,
        "configurations": report,
        "targets": step_report.targets(report, setup),
        "phase1_feature_cache": feature_cache_report,
    }
    harness.print_json_line(payload)
    # The record's name adds what the line does not say: a subset of configurations.
    subset = [name.removeprefix("effpipe/") for name in _CONFIGURATIONS.value]
    if not subset and not _NOTEBOOK_BASELINE.value:
        subset = ["nonotebook"]
    records.record_benchmark(payload, ["+".join(subset)] if subset else [])


if __name__ == "__main__":
    harness.run_main("benchmarks.step_throughput", main)
