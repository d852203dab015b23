"""The step benchmark's report: medians per configuration, ratios, targets, the table.

Used by `benchmarks.step_throughput`; reads no flags and imports no TensorFlow. A
record is one repeat's `ThroughputMeter` record; the first repeat is warm-up.
"""

import statistics

from benchmarks import harness

# Like-with-like pairs for speedup_vs_notebook.
NOTEBOOK_PAIRS = {
    "effpipe/noaug/synthetic": "notebook/synthetic",
    "effpipe/noaug/pipeline": "notebook/numpy",
    "effpipe/aug/pipeline": "notebook/generator",
}
# The keras_recipe peer augments on the host and is fed by its own tf.data chain: its
# like is effpipe fed by its pipeline, augmenting on the device.
KERAS_RECIPE_PAIR = ("effpipe/aug/pipeline", "keras_recipe")
# Targets of the benchmark (checked here, never in timed tests).
GPU_PHASE1_TARGET_SPEEDUP = 5.0
GPU_TARGET_SPEEDUP_VS_KERAS_RECIPE = 1.5
AUGMENT_MAX_SHARE = 0.15


def summarize(configurations: list) -> dict[str, dict]:
    """Median figures per configuration (warm-up repeat dropped) and the ratios to the
    notebook and to the keras_recipe peer.

    Args:
      configurations: `step_configurations.Configuration`s, each with its repeats'
        records.

    Returns:
      {name: {seconds_per_repeat, steps_per_repeat, ms_per_step, images_per_sec,
      peak_memory_mb, speedup_vs_notebook, speedup_vs_keras_recipe[,
      input_bound_fraction]}}; speedup_vs_keras_recipe is set on effpipe/aug/pipeline
      when both it and keras_recipe ran, None elsewhere.
    """
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
            "speedup_vs_keras_recipe": None,
        }
    for name, notebook_name in NOTEBOOK_PAIRS.items():
        if name in report and notebook_name in report:
            report[name]["speedup_vs_notebook"] = (
                report[notebook_name]["ms_per_step"] / report[name]["ms_per_step"]
            )
    name, peer_name = KERAS_RECIPE_PAIR
    if name in report and peer_name in report:
        report[name]["speedup_vs_keras_recipe"] = (
            report[peer_name]["ms_per_step"] / report[name]["ms_per_step"]
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
    on_gpu = setup.accelerator == "gpu"
    for name, configuration, key, gpu_target in (
        ("noaug_speedup_vs_notebook_as_run", "effpipe/noaug/pipeline", "speedup_vs_notebook",
         GPU_PHASE1_TARGET_SPEEDUP),
        ("aug_speedup_vs_keras_recipe", KERAS_RECIPE_PAIR[0], "speedup_vs_keras_recipe",
         GPU_TARGET_SPEEDUP_VS_KERAS_RECIPE),
    ):  # fmt: skip
        speedup = report.get(configuration, {}).get(key)
        if speedup is not None:
            needed = gpu_target if on_gpu else 1.0
            checks[name] = {"value": speedup, "limit": needed, "met": speedup >= needed}
    return checks


def _percent(fraction):
    return None if fraction is None else 100.0 * fraction


def print_report(report: dict, setup, feature_cache_report: dict | None = None) -> None:
    """The table, one line per target and, in phase 1, the feature cache's epoch."""
    rows = [
        [
            name,
            figures["ms_per_step"],
            figures["images_per_sec"],
            _percent(figures.get("input_bound_fraction")),
            figures["peak_memory_mb"],
            figures["speedup_vs_notebook"],
            figures["speedup_vs_keras_recipe"],
        ]
        for name, figures in report.items()
    ]
    harness.print_table(
        ["configuration", "ms/step", "images/s", "input-bound %", "peak MB", "x notebook",
         "x keras_recipe"],
        rows,
    )  # fmt: skip
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
