"""What a run actually gets: device, precision policy and XLA, resolved honestly.

`--mixed_precision` computes in a 16-bit float with float32 variables;
`--mixed_precision_dtype` says which:
  auto      float16 on a GPU (with dynamic loss scaling), bfloat16 on a CPU or TPU
  float16   with dynamic loss scaling (Keras wraps the optimizer in a
            LossScaleOptimizer); forced on a CPU it runs the GPU's loss-scaling path,
            which is how the tests exercise it
  bfloat16  float32's exponent range, so no loss scaling; on a GPU it needs an
            Ampere or newer one (compute capability 8.0), whose tensor cores run it
`--xla=auto` is on for GPU and TPU and off on CPU, where a compiled EfficientNet
train step measured 8x slower than without XLA on this project's machines. Each
decision carries its reason for the log.

A GPU that `nvidia-smi` lists but TensorFlow cannot use (a CPU-only TensorFlow, or
CUDA libraries missing) is the most common way a GPU run silently trains on the CPU:
`Devices.warnings` names the fix, and `--require_gpu` makes it an error. A GPU run
in float32 gets one hint naming --mixed_precision (`Runtime.hints`).
"""

import dataclasses
import shutil
import subprocess

import tensorflow as tf

from effpipe.config import RuntimeConfig, TrainConfig
from effpipe.errors import UsageError

# bfloat16 tensor-core arithmetic arrived with Ampere (compute capability 8.0).
BFLOAT16_MIN_COMPUTE_CAPABILITY = (8, 0)


# A GPU run in float32, for the log: mixed precision stays a choice (the notebook's
# recipe runs without it), but a user should know it is there.
MIXED_PRECISION_HINT = (
    "hint: this run computes in float32 on the GPU; --mixed_precision computes in "
    "16-bit floats with float32 variables: faster on tensor cores, and about half "
    "the activation memory, so a larger batch fits"
)

# How a user gets TensorFlow's CUDA build (setup.cfg's gpu extra).
GPU_INSTALL_HINT = "install TensorFlow's GPU build: make venv GPU=1, or pip install -e '.[gpu]'"


@dataclasses.dataclass(frozen=True)
class Devices:
    """The accelerators this process sees.

    Attributes:
      accelerator: "gpu", "tpu" or "cpu": the kind the model runs on.
      description: human-readable, for logs and metrics.json ("NVIDIA H200", "CPU").
      compute_capability: (major, minor) of the first GPU, or None.
      unused_gpus: GPUs the NVIDIA driver lists while TensorFlow sees none.
    """

    accelerator: str
    description: str
    compute_capability: tuple[int, int] | None = None
    unused_gpus: tuple[str, ...] = ()

    @property
    def warnings(self) -> tuple[str, ...]:
        """Sentences to log as warnings: a GPU this TensorFlow cannot use."""
        if not self.unused_gpus:
            return ()
        return (
            f"{self.describe_unused_gpus()}, so this run computes on the CPU: "
            f"{GPU_INSTALL_HINT} (--require_gpu stops instead)",
        )

    def describe_unused_gpus(self) -> str:
        return (
            f"nvidia-smi lists {len(self.unused_gpus)} GPU(s) ({self.unused_gpus[0]}) but "
            f"TensorFlow {tf.__version__} sees none"
        )


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The resolved execution settings of a run.

    Attributes:
      accelerator: "gpu", "tpu" or "cpu".
      device: a human-readable device description for logs and metrics.json.
      precision: the Keras dtype policy name ("float32", "mixed_float16",
        "mixed_bfloat16").
      loss_scaling: whether the optimizer scales the loss (mixed_float16 only).
      xla: whether the train step is compiled with XLA.
      reasons: one sentence per decision, for the log.
      warnings: sentences to log as warnings.
      hints: sentences to log as information: a faster setting the run could use.
    """

    accelerator: str
    device: str
    precision: str
    loss_scaling: bool
    xla: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()


def nvidia_smi_gpus() -> list[str]:
    """The GPUs the NVIDIA driver lists (`nvidia-smi -L`), without TensorFlow.

    Returns:
      One line per GPU ("GPU 0: NVIDIA H200 (UUID: ...)"); empty when nvidia-smi is
      absent, fails or lists none.
    """
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listed.returncode != 0:
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.startswith("GPU ")]


def detect_devices() -> Devices:
    """The accelerator of this process: TPU, else the first GPU, else the CPU."""
    tpus = tf.config.list_logical_devices("TPU")
    if tpus:
        return Devices("tpu", f"TPU x{len(tpus)}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", "GPU")
        capability = details.get("compute_capability")
        return Devices(
            "gpu",
            f"{name} x{len(gpus)}" if len(gpus) > 1 else name,
            tuple(capability) if capability else None,
        )
    return Devices("cpu", "CPU", unused_gpus=tuple(nvidia_smi_gpus()))


def require_gpu() -> None:
    """Raises UsageError unless TensorFlow sees a GPU (`--require_gpu`).

    Lists physical devices only, so it may run before a distribution strategy
    configures TensorFlow's devices.
    """
    if tf.config.list_physical_devices("GPU"):
        return
    unused = Devices("cpu", "CPU", unused_gpus=tuple(nvidia_smi_gpus()))
    if unused.unused_gpus:
        raise UsageError(f"--require_gpu: {unused.describe_unused_gpus()}: {GPU_INSTALL_HINT}")
    raise UsageError(
        "--require_gpu: no GPU is visible (nvidia-smi lists none and TensorFlow sees "
        "none): run on a machine with an NVIDIA GPU and its driver, or drop --require_gpu"
    )


def cap_gpu_memory(mib: int) -> None:
    """Caps TensorFlow's allocator on the first GPU at `mib` MiB (a logical device), so
    that a step needing more fails out of memory as on a smaller card; nothing on a
    machine without a GPU. Call it before anything starts the GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=mib)]
        )


def resolve_runtime(
    *,
    mixed_precision: bool,
    xla: str,
    mixed_precision_dtype: str = "auto",
    local_replicas: int = 1,
    devices: Devices | None = None,
) -> Runtime:
    """Resolves the precision policy and the XLA switch for this machine.

    Args:
      mixed_precision: the `--mixed_precision` flag.
      xla: "auto", "on" or "off".
      mixed_precision_dtype: "auto", "float16" or "bfloat16" (see the module
        docstring).
      local_replicas: replicas of a distribution strategy in this process.
      devices: the accelerators to resolve for; by default `detect_devices()`.

    Returns:
      The Runtime, with a reason per decision.

    Raises:
      UsageError: bfloat16 on a GPU older than Ampere, float16 on a TPU, or
        --xla=on with several replicas on CPU devices.
    """
    devices = devices or detect_devices()
    accelerator = devices.accelerator
    reasons = []
    if not mixed_precision:
        precision = "float32"
        reasons.append("precision float32 (--mixed_precision not set)")
    else:
        dtype = mixed_precision_dtype
        if dtype == "auto":
            dtype = "float16" if accelerator == "gpu" else "bfloat16"
        _check_precision_fits_device(dtype, devices)
        precision = f"mixed_{dtype}"
        how = "auto" if mixed_precision_dtype == "auto" else f"--mixed_precision_dtype={dtype}"
        reasons.append(
            f"precision {precision} on {accelerator.upper()} ({how})"
            + (", with dynamic loss scaling" if dtype == "float16" else ", no loss scaling")
        )
    warnings = list(devices.warnings)
    several_gpu_replicas_in_float16 = (
        accelerator == "gpu" and local_replicas > 1 and precision == "mixed_float16"
    )
    if xla == "on" and accelerator == "cpu" and local_replicas > 1:
        raise UsageError(
            f"--xla=on with {local_replicas} replicas on CPU devices fails: a compiled "
            "MirroredStrategy step reads variables of another device (measured with and "
            "without loss scaling): use --xla=auto or off"
        )
    if xla == "auto":
        use_xla = accelerator in ("gpu", "tpu") and not several_gpu_replicas_in_float16
        if several_gpu_replicas_in_float16:
            why = (
                f": {local_replicas} replicas with float16 loss scaling, which "
                "keras-team/keras#21366 reports failing under XLA (not verified here)"
            )
        elif not use_xla:
            why = ": a compiled step measured 8x slower on CPU"
        else:
            why = ""
        reasons.append(
            f"XLA {'on' if use_xla else 'off'} (--xla=auto on {accelerator.upper()}{why})"
        )
    else:
        use_xla = xla == "on"
        reasons.append(f"XLA {xla} (--xla={xla})")
        if use_xla and several_gpu_replicas_in_float16:
            warnings.append(
                f"--xla=on with {local_replicas} replicas and float16 loss scaling: "
                "keras-team/keras#21366 reports this failing in merge_call (not verified "
                "on this TensorFlow); --xla=auto turns XLA off here"
            )
    return Runtime(
        accelerator,
        devices.description,
        precision,
        precision == "mixed_float16",
        use_xla,
        tuple(reasons),
        tuple(warnings),
        hints=(MIXED_PRECISION_HINT,) if accelerator == "gpu" and not mixed_precision else (),
    )


def resolve(
    runtime_config: RuntimeConfig, *, local_replicas: int = 1, devices: Devices | None = None
) -> Runtime:
    """`resolve_runtime` for a run's runtime slice, with XLA off under --debug_numerics.

    Args:
      runtime_config: --mixed_precision, --mixed_precision_dtype, --xla and
        --debug_numerics.
      local_replicas: replicas of a distribution strategy in this process.
      devices: the accelerators to resolve for; by default `detect_devices()`.

    Returns:
      The Runtime, with a reason per decision.

    Raises:
      UsageError: see `resolve_runtime`.
    """
    setup = resolve_runtime(
        mixed_precision=runtime_config.mixed_precision,
        mixed_precision_dtype=runtime_config.mixed_precision_dtype,
        xla=runtime_config.xla,
        local_replicas=local_replicas,
        devices=devices,
    )
    if runtime_config.debug_numerics and setup.xla:
        setup = dataclasses.replace(
            setup,
            xla=False,
            reasons=(*setup.reasons, "XLA off: --debug_numerics instruments ops XLA cannot run"),
        )
    return setup


def _check_precision_fits_device(dtype: str, devices: Devices) -> None:
    capability = devices.compute_capability
    if (
        dtype == "bfloat16"
        and devices.accelerator == "gpu"
        and capability is not None
        and tuple(capability) < BFLOAT16_MIN_COMPUTE_CAPABILITY
    ):
        raise UsageError(
            f"--mixed_precision_dtype=bfloat16 needs an Ampere or newer GPU (compute "
            f"capability 8.0+); {devices.description} is {capability[0]}.{capability[1]}: "
            "use --mixed_precision_dtype=float16 (or auto)"
        )
    if dtype == "float16" and devices.accelerator == "tpu":
        raise UsageError(
            "--mixed_precision_dtype=float16 does not run on a TPU: use bfloat16 (or auto)"
        )


# The most train steps per compiled call that --steps_per_execution=0 (auto) picks.
# Each call costs the host about 0.95 ms (Python, the tf.function call, Keras' logs
# turned into floats after every call on the TensorFlow backend): measured by
# benchmarks.step_throughput on this project's CPU, the phase-1 head on cached
# features ran at 1.96 ms/step one step per call and 1.01 at 25 (README.md, Performance). A whole
# EfficientNet step on a CPU (260 ms for B0 at 224 px) hides that overhead, so the
# CPU keeps 1; a GPU or TPU step of a few milliseconds (B0 on a large GPU) does not.
AUTO_STEPS_PER_EXECUTION = {"head": 32, "gpu": 8, "tpu": 8, "cpu": 1}


def tuner_command(config: TrainConfig) -> str:
    """The batch-size tuner's command for this run's model, for messages."""
    flags = [
        f"--variant={config.model.variant}",
        f"--image_size={config.model.resolved_image_size}",
    ]
    if config.runtime.mixed_precision:
        flags.append("--mixed_precision")
        if config.runtime.mixed_precision_dtype != "auto":
            flags.append(f"--mixed_precision_dtype={config.runtime.mixed_precision_dtype}")
    flags.append(f"--unfreeze_blocks={config.phases.unfreeze_blocks}")
    return " ".join(["python -m effpipe.tune_batch", *flags, "--memory_budget_gb=GB"])


def resolve_steps_per_execution(
    config: TrainConfig,
    steps_per_epoch: int | None,
    *,
    accelerator: str,
    head_only: bool = False,
) -> tuple[int | None, str]:
    """The train steps per compiled call of one phase, with the reason for the log.

    An epoch must be a whole number of calls: Keras runs every call's N steps on an
    endless stream, so a call that crossed the epoch's end would train steps of the
    next epoch and break the resume arithmetic.

    Args:
      config: the run configuration (--steps_per_execution, --profile_steps).
      steps_per_epoch: train steps of one epoch; None before the data is loaded
        (--print_config), when the reason states the rule.
      accelerator: "gpu", "tpu" or "cpu".
      head_only: the phase fits the head alone (phase 1 on cached features).

    Returns:
      (steps per call, reason); the steps are None when they depend on the unknown
      `steps_per_epoch`.

    Raises:
      UsageError: an explicit --steps_per_execution that does not divide the epoch.
    """
    requested = config.runtime.steps_per_execution
    if requested:
        if steps_per_epoch is not None and steps_per_epoch % requested:
            raise UsageError(
                f"--steps_per_execution={requested} must divide the {steps_per_epoch} train "
                f"steps of an epoch: use {_largest_divisor(steps_per_epoch, requested)}, or "
                "0 (auto)"
            )
        return requested, f"{requested} train step(s) per call (--steps_per_execution)"
    if config.outputs.profile_steps:
        return 1, "1 train step per call (auto: --profile_steps traces single steps)"
    kind = "head" if head_only else accelerator
    at_most = AUTO_STEPS_PER_EXECUTION[kind]
    what = "the head on cached features" if head_only else f"the whole model on {kind.upper()}"
    if steps_per_epoch is None and at_most == 1:
        return 1, f"1 train step per call (auto: 1 for {what})"
    if steps_per_epoch is None:
        return None, (
            f"up to {at_most} train steps per call (auto for {what}: the most, up to "
            f"{at_most}, that divide the train steps of an epoch)"
        )
    steps = _largest_divisor(steps_per_epoch, at_most)
    return steps, (
        f"{steps} train step(s) per call (auto: up to {at_most} for "
        f"{what}, dividing the {steps_per_epoch} steps of an epoch)"
    )


def _largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, max(min(number, at_most), 1) + 1) if number % d == 0)
