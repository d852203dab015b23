"""What a run actually gets: device, precision policy and XLA, resolved honestly.

`--mixed_precision` means mixed_float16 (with loss scaling) on a GPU and
mixed_bfloat16 on a CPU or TPU. `--xla=auto` is on for GPU and TPU and off on
CPU, where a compiled EfficientNet train step measured 8x slower than without XLA
on this project's machines. Each decision carries its reason for the log.
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The resolved execution settings of a run.

    Attributes:
      accelerator: "gpu", "tpu" or "cpu".
      device: a human-readable device description for logs and metrics.json.
      precision: the Keras dtype policy name.
      xla: whether the train step is compiled with XLA.
      reasons: one sentence per decision, for the log.
    """

    accelerator: str
    device: str
    precision: str
    xla: bool
    reasons: tuple[str, ...]


def detect_accelerator() -> tuple[str, str]:
    """Returns (accelerator kind, description) of the first visible device."""
    tpus = tf.config.list_logical_devices("TPU")
    if tpus:
        return "tpu", f"TPU x{len(tpus)}"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", "GPU")
        return "gpu", f"{name} x{len(gpus)}" if len(gpus) > 1 else name
    return "cpu", "CPU"


def resolve_runtime(*, mixed_precision: bool, xla: str) -> Runtime:
    """Resolves the precision policy and the XLA switch for this machine.

    Args:
      mixed_precision: the `--mixed_precision` flag.
      xla: "auto", "on" or "off".

    Returns:
      The Runtime, with a reason per decision.
    """
    accelerator, device = detect_accelerator()
    reasons = []
    if not mixed_precision:
        precision = "float32"
        reasons.append("precision float32 (--mixed_precision not set)")
    elif accelerator == "gpu":
        precision = "mixed_float16"
        reasons.append("precision mixed_float16 on GPU, with dynamic loss scaling")
    else:
        precision = "mixed_bfloat16"
        reasons.append(
            f"precision mixed_bfloat16: --mixed_precision means bfloat16 on {accelerator.upper()}"
        )
    if xla == "auto":
        use_xla = accelerator in ("gpu", "tpu")
        reasons.append(
            f"XLA {'on' if use_xla else 'off'} (--xla=auto on {accelerator.upper()}"
            + ("" if use_xla else ": a compiled step measured 8x slower on CPU")
            + ")"
        )
    else:
        use_xla = xla == "on"
        reasons.append(f"XLA {xla} (--xla={xla})")
    return Runtime(accelerator, device, precision, use_xla, tuple(reasons))
