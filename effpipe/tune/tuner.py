"""The batch-size tuner's work: estimates, trials of the real train step, the report.

`tune` answers, per phase, the largest batch that trains inside a memory budget:
measured by trials in subprocesses on a GPU, estimated analytically elsewhere (see
`effpipe.tune_batch` for the command and `effpipe.tune.memory` for the
formula). `run_trial` is one trial: the trainer's model, phase set-up, compile and
`fit`, on random uint8 images of the source size, timed by the trainer's meter.
"""

import dataclasses
import functools
import os
import resource
import tempfile
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from effpipe.config import TrainConfig
from effpipe.errors import UsageError, is_out_of_memory
from effpipe.model import factory, freezing
from effpipe.training import callbacks, runtime
from effpipe.tune import memory, search

MIB = search.MIB


def num_classes_of(config: TrainConfig) -> int:
    """The classifier's outputs for the run's dataset (memory barely depends on it)."""
    if config.data.dataset == "shapes":
        return config.data.shapes_num_classes
    if config.data.dataset.startswith("folder:"):
        train = os.path.join(config.data.dataset.removeprefix("folder:"), "train")
        if os.path.isdir(train):
            count = sum(os.path.isdir(os.path.join(train, name)) for name in os.listdir(train))
            return max(count, 2)
    return 100  # CIFAR-100.


def make_phase_model(config: TrainConfig, phase: int) -> keras.Model:
    """The trainer's model for `config`, random base weights, set up for `phase`."""
    source_size = (config.source_size, config.source_size)
    model = factory.make_configured_model(
        config.model,
        config.augmentation,
        source_size,
        num_classes_of(config),
        seed=config.seed,
        compile_augmentation=not config.runtime.debug_numerics,
        random_weights=True,
    )
    freezing.check_unfreeze_blocks(model, config.phases.unfreeze_blocks)
    freezing.set_phase(
        model,
        phase,
        unfreeze_blocks=config.phases.unfreeze_blocks,
        from_scratch=config.model.weights == "none",
    )
    return model


def gpu_precision(config: TrainConfig) -> str:
    """The dtype policy the run's model trains under on a GPU (the estimate's)."""
    return runtime.resolve_runtime(
        mixed_precision=config.runtime.mixed_precision,
        mixed_precision_dtype=config.runtime.mixed_precision_dtype,
        xla="off",
        devices=runtime.Devices("gpu", "GPU"),
    ).precision


def estimate_phase(
    config: TrainConfig, phase: int, usable_bytes: int, max_batch: int
) -> tuple[int, list[search.Trial], memory.ModelMemory]:
    """The estimated largest batch of `phase` on a GPU, with the search's probes.

    The model is built under the GPU's policy (mixed_float16 with
    --mixed_precision, else float32), whatever this machine is.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(gpu_precision(config))
    try:
        model = make_phase_model(config, phase)
        measured = memory.measure_model(model)
    finally:
        keras.mixed_precision.set_global_policy(previous)
        keras.backend.clear_session()

    def estimate(batch_size: int) -> search.Trial:
        fits = measured.estimate(batch_size).total <= usable_bytes
        return search.Trial(batch_size, fits, note="estimated")

    best, trials = search.search_max_batch(estimate, start=1, max_batch=max_batch)
    return best, trials, measured


def run_trial(
    config: TrainConfig, phase: int, batch_size: int, usable_bytes: int, *, steps: int
) -> dict:
    """Trains `steps` steps twice at `batch_size` in this process; returns Trial fields.

    On a GPU its memory is capped first at `usable_bytes` (a logical device), so
    call this in a fresh process; its peak is the allocator's. On a CPU nothing can
    cap the step: it runs, and its peak is the process's peak RSS (TensorFlow
    included), which the measured search compares with the budget (`tune`). Out of
    memory answers fits=False; any other failure answers {"error": one line}.
    """
    runtime.cap_gpu_memory(usable_bytes // MIB)
    gpus = tf.config.list_physical_devices("GPU")
    setup = runtime.resolve_runtime(
        mixed_precision=config.runtime.mixed_precision,
        mixed_precision_dtype=config.runtime.mixed_precision_dtype,
        xla=config.runtime.xla,
    )
    keras.mixed_precision.set_global_policy(setup.precision)
    size, classes = config.source_size, num_classes_of(config)
    rng = np.random.default_rng(config.seed)
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, (batch_size,), dtype=np.int64)
    meter = callbacks.ThroughputMeter(batch_size, log_every_epoch=False)
    try:
        model = make_phase_model(config, phase)
        learning_rate = (
            config.phases.phase1_learning_rate if phase == 1 else config.phases.phase2_learning_rate
        )
        factory.compile_model(model, learning_rate, jit_compile=setup.xla)
        rss_before_fit = _current_rss_mib()
        # The first epoch compiles and warms up; the second is timed.
        model.fit(
            tf.data.Dataset.from_tensors((images, labels)).repeat(),
            steps_per_epoch=steps,
            epochs=2,
            callbacks=[meter],
            verbose=0,
        )
    except UsageError as error:
        return {"error": str(error)}
    except Exception as error:
        text = str(error)
        if is_out_of_memory(error):
            return {"fits": False, "note": f"out of memory ({type(error).__name__})"}
        return {"error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"}
    throughput = meter.records[-1]["images_per_sec"]
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / MIB
        note = f"allocator peak on {setup.device}, {setup.precision}, XLA {setup.xla}"
    else:
        peak = _peak_rss_mib()
        note = (
            f"CPU: peak RSS of the whole process, TensorFlow included; "
            f"{peak - rss_before_fit:.0f} MiB above it before the first step"
        )
    return {"fits": True, "peak_mib": peak, "images_per_sec": throughput, "note": note}


def tune(
    config: TrainConfig,
    *,
    phases: list[int],
    usable_bytes: int,
    method: str,
    max_batch: int,
    resolution: int,
    cpu_trial_batch: int,
    trial_command: Callable[[int, int, str], list[str]],
    trial_flagfile_text: str,
    trial_timeout_s: float,
) -> dict:
    """Finds each phase's largest batch; returns the report (see tune_batch).

    Args:
      config: the run's configuration (its batch size is ignored).
      phases: which phases to answer, of 1 and 2.
      usable_bytes: the allocator's budget.
      method: "auto", "measured" or "estimated".
      max_batch: the search's ceiling.
      resolution: the measured search's resolution (`search.search_max_batch`).
      cpu_trial_batch: without a GPU, the batch of the sanity trial (0: none).
      trial_command: (batch, phase, flagfile) -> the argv of one trial subprocess.
      trial_flagfile_text: this run's flags, written for the trial subprocesses.
      trial_timeout_s: seconds before a silent trial is killed.

    Without a GPU, `measured` runs the same search with CPU trials, each judged
    by its process's peak RSS against the budget (host memory; see `run_trial`).

    Raises:
      UsageError: a trial failing for a reason other than memory.
    """
    gpus = tf.config.list_physical_devices("GPU")
    measured = method == "measured" or (method == "auto" and bool(gpus))
    device = "CPU"
    if gpus:
        device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        # This process only builds models for the estimate: the GPU stays free for
        # the trials.
        tf.config.set_visible_devices([], "GPU")
    report = {
        "method": "measured" if measured else "estimated",
        "device": device,
        "phases": phases,
        "usable_mib": usable_bytes // MIB,
        "trials": [],
        "estimate": {},
    }
    with tempfile.TemporaryDirectory(prefix="effpipe-tune-") as directory:
        flagfile = os.path.join(directory, "trial.flags")
        with open(flagfile, "w") as file:
            file.write(trial_flagfile_text)

        def trial_of(phase: int, judge_rss: bool = False) -> Callable[[int], search.Trial]:
            return functools.partial(
                _subprocess_trial,
                lambda batch_size: trial_command(batch_size, phase, flagfile),
                phase=phase,
                usable_bytes=usable_bytes,
                timeout_s=trial_timeout_s,
                judge_rss=judge_rss,
            )

        for phase in phases:
            estimated_best, estimated_trials, model_memory = estimate_phase(
                config, phase, usable_bytes, max_batch
            )
            report["estimate"][f"phase{phase}"] = {
                "max_batch": estimated_best,
                "mib_at_max_batch": (
                    model_memory.estimate(estimated_best).as_mib() if estimated_best else None
                ),
            }
            if measured:
                best, trials = search.search_max_batch(
                    trial_of(phase, judge_rss=not gpus),
                    start=max(estimated_best, 1),
                    max_batch=max_batch,
                    resolution=resolution,
                )
                method_name = "measured"
            else:
                best, trials, method_name = estimated_best, estimated_trials, "estimated"
            report[f"phase{phase}_max_batch"] = best
            for trial in trials:
                record = {"phase": phase, "method": method_name, **dataclasses.asdict(trial)}
                record["estimated_mib"] = model_memory.estimate(trial.batch_size).total / MIB
                report["trials"].append(_rounded(record))
        if not measured and cpu_trial_batch:
            phase = phases[-1]
            trial = trial_of(phase)(cpu_trial_batch)
            report["cpu_trial"] = _rounded(
                {
                    "phase": phase,
                    **dataclasses.asdict(trial),
                    "estimated_mib": model_memory.estimate(cpu_trial_batch).total / MIB,
                }
            )
    return report


def _subprocess_trial(
    command_of, batch_size: int, *, phase: int, usable_bytes: int, timeout_s: float, judge_rss: bool
) -> search.Trial:
    """One trial of `batch_size` in a subprocess (`command_of(batch_size)` is its argv).

    With `judge_rss` (a CPU trial) it fits only if its peak RSS stayed in the budget:
    a CPU step cannot be capped like a GPU allocator.
    """
    logging.info("phase %d: trying batch %d", phase, batch_size)
    try:
        trial = search.run_trial_subprocess(command_of(batch_size), batch_size, timeout_s)
    except RuntimeError as error:
        raise UsageError(str(error)) from error
    if judge_rss and trial.fits and trial.peak_mib > usable_bytes / MIB:
        trial.fits = False
        trial.note += f"; over the {usable_bytes / MIB:.0f} MiB budget"
    return trial


def print_report(report: dict) -> None:
    """The trials as a table, then each phase's answer."""
    print(
        f"batch-size tuner: {report['method']} on {report['device']}, "
        f"{report['usable_mib']} MiB for TensorFlow's allocator"
    )
    print(f"{'phase':>5} {'batch':>6} {'fits':>5} {'peak MiB':>9} {'est. MiB':>9} {'images/s':>9}")
    for trial in report["trials"]:
        peak = f"{trial['peak_mib']:.0f}" if trial["peak_mib"] is not None else "-"
        speed = f"{trial['images_per_sec']:.1f}" if trial["images_per_sec"] else "-"
        print(
            f"{trial['phase']:>5} {trial['batch_size']:>6} {'yes' if trial['fits'] else 'no':>5} "
            f"{peak:>9} {trial['estimated_mib']:>9.0f} {speed:>9}"
            + (f"  {trial['note']}" if trial["note"] and trial["note"] != "estimated" else "")
        )
    for phase in report["phases"]:
        estimate = report["estimate"][f"phase{phase}"]
        terms = estimate["mib_at_max_batch"]
        breakdown = (
            ", ".join(f"{name} {value:.0f}" for name, value in terms.items()) if terms else "-"
        )
        print(
            f"phase {phase}: largest batch {report[f'phase{phase}_max_batch']} "
            f"({report['method']}); the estimate says {estimate['max_batch']} "
            f"(MiB at that batch: {breakdown})"
        )
    if "cpu_trial" in report:
        trial = report["cpu_trial"]
        if trial["fits"]:
            print(
                f"CPU sanity trial, phase {trial['phase']}, batch {trial['batch_size']}: "
                f"peak RSS {trial['peak_mib']:.0f} MiB, {trial['images_per_sec']:.1f} "
                f"images/s ({trial['note']}); the estimate of the GPU step at that batch: "
                f"{trial['estimated_mib']:.0f} MiB"
            )
        else:
            print(f"CPU sanity trial at batch {trial['batch_size']} failed: {trial['note']}")


def _rounded(record: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in record.items()}


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
