"""The configuration as a run would resolve it on this machine (`--print_config`).

    python -m effpipe.train --flagfile=flags/b5_rtx3070.flags --workdir=runs/b5 --print_config

Every flag by section, and under each section what the run resolves from it: the
model and source resolution, the decoded-image cache, the phases' recipe and
feature cache, the device, precision, XLA and steps per call (`runtime`), the
replicas and the batch per replica (`distribution`). It reuses the trainer's own
resolvers and loads no data and builds no model, so what depends on the data is
stated as its rule: the steps per call divide an epoch's train steps, and
--cache=auto decides per split by its decoded size. A multi-worker run is not
joined and a TPU not connected: their replicas are counted from TF_CONFIG and
stated, respectively.
"""

import tensorflow as tf

from effpipe import config as config_lib
from effpipe import run_dir
from effpipe.data import stores
from effpipe.training import cluster, feature_cache, optimization, runtime
from effpipe.training import distribution as distribution_lib

# The width of the flag-name column.
_NAME_WIDTH = 24


def describe(
    config: config_lib.TrainConfig, workdir: str, *, devices: runtime.Devices | None = None
) -> str:
    """The text `--print_config` prints: every field by section, then what it resolves to.

    Args:
      config: the run configuration.
      workdir: the run directory (where the decoded-image cache goes by default).
      devices: the accelerators to resolve for; by default `runtime.detect_devices()`.

    Returns:
      Lines of text, ending with a newline.

    Raises:
      UsageError: what the run itself would refuse before loading data (a batch that
        does not divide by the replicas, a precision the device cannot run).
    """
    resolved = resolve(config, workdir, devices=devices)
    flat = config.to_flat()
    lines = ["The configuration by section; each -> line is what a run here resolves from it."]
    for section, title in config_lib.SECTION_TITLES.items():
        lines += ["", f"{title}:"]
        for name, slice_name in config_lib.FIELD_SLICES.items():
            if slice_name == section:
                lines.append(f"  {name:<{_NAME_WIDTH}} {flat[name]}")
        lines += [f"  -> {line}" for line in resolved.get(section, ())]
    return "\n".join(lines) + "\n"


def resolve(
    config: config_lib.TrainConfig, workdir: str, *, devices: runtime.Devices | None = None
) -> dict[str | None, tuple[str, ...]]:
    """What the run resolves, as sentences by section (a key of SECTION_TITLES).

    Args and Raises: see `describe`.
    """
    # The strategy first, as in the trainer.
    local_replicas, distributed, distribution_lines = _resolve_replicas(config)
    devices = devices or runtime.detect_devices()
    setup = runtime.resolve(config.runtime, local_replicas=local_replicas, devices=devices)
    use_feature_cache, feature_cache_reason = feature_cache.resolve(config, distributed=distributed)
    steps = [
        f"phase {phase}: "
        + runtime.resolve_steps_per_execution(
            config,
            None,
            accelerator=setup.accelerator,
            head_only=phase == 1 and use_feature_cache,
        )[1]
        for phase in (1, 2)
    ]
    recipe = (
        f"phase 1: {config.phases.phase1_epochs} epoch(s) of the head on a frozen base, "
        f"{optimization.describe(config, 1)}",
        f"phase 2: {config.phases.phase2_epochs} epoch(s) with the top "
        f"{config.phases.unfreeze_blocks} blocks unfrozen, {optimization.describe(config, 2)}",
    )
    return {
        "data": (_source_size(config), _cache(config, workdir)),
        "model": (_image_size(config.model),),
        "phases": (*recipe, feature_cache_reason),
        "runtime": (
            f"device: {setup.device}",
            *setup.warnings,
            *setup.reasons,
            *setup.hints,
            *steps,
        ),
        "distribution": distribution_lines,
    }


def _image_size(model: config_lib.ModelConfig) -> str:
    why = "--image_size" if model.image_size else f"0: {model.variant}'s native size"
    return f"image size {model.resolved_image_size} px ({why})"


def _source_size(config: config_lib.TrainConfig) -> str:
    data = config.data
    if data.source_size:
        why = "--source_size"
    elif data.dataset in ("cifar100", "shapes"):
        why = "0: 32 px, CIFAR's own size, for cifar100 and shapes"
    else:
        why = "0: the model resolution"
        if data.dataset.startswith("tfds:"):
            why += "; a tfds dataset whose images all have one smaller size keeps it"
    return f"source size {config.source_size} px, decoded on the host ({why})"


def _cache(config: config_lib.TrainConfig, workdir: str) -> str:
    data = config.data
    folder = run_dir.image_cache_root(workdir, data.cache_dir)
    if data.cache == "off":
        return "cache off: every pass decodes the images again"
    if data.cache == "memory":
        return "cache memory: each split decoded once into memory"
    if data.cache == "disk":
        return f"cache disk: each split decoded once into {folder}, reused by later runs"
    images = data.cache_memory_mb * 2**20 // stores.cached_bytes(config.source_size)
    return (
        f"cache auto: a split whose decoded images fit in {data.cache_memory_mb} MB "
        f"(up to {images} images at {config.source_size} px) in memory, a larger one "
        f"on disk in {folder}"
    )


def _resolve_replicas(config: config_lib.TrainConfig) -> tuple[int, bool, tuple[str, ...]]:
    """(replicas in this process, whether distributed, sentences): the trainer's own
    strategy where making it is local; without joining the cluster or connecting to
    the TPU otherwise."""
    kind, batch_size = config.distribution.strategy, config.batch_size
    if kind == "tpu":
        return (
            1,
            True,
            (
                "strategy tpu (--strategy=tpu): one replica per TPU core, counted once the "
                f"run connects; --batch_size={batch_size} must divide by them",
            ),
        )
    if kind == "multi_worker":
        # Each worker trains on its local GPUs, or one CPU (effpipe.training.distribution).
        task = cluster.current_task(kind)
        local = max(len(tf.config.list_physical_devices("GPU")), 1)
        replicas = task.num_workers * local
        per_replica = distribution_lib.check_global_batch(
            batch_size, replicas, f"{task.num_workers} workers"
        )
        return (
            local,
            True,
            (
                f"strategy multi_worker (--strategy=multi_worker, TF_CONFIG): {replicas} "
                f"replica(s) over {task.num_workers} worker(s), {per_replica} images per "
                "replica per step (counted; the cluster is not joined)",
            ),
        )
    distribution = distribution_lib.resolve(kind, batch_size)
    return distribution.num_replicas, distribution.is_distributed, distribution.reasons
