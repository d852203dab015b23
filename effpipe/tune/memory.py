"""An analytical estimate of a train step's peak device memory, from the real model.

Used by the batch-size tuner when no GPU is at hand. It walks the Keras model the
trainer builds (augment + resize layer, the nested EfficientNet base, the head),
reads every layer's output shape and dtype and every variable's size, and adds:

    weights        every variable (float32), plus a 16-bit copy of each under
                   mixed precision (Keras casts variables to the compute dtype)
    gradients      one float32 gradient per trainable weight
    optimizer      Adam's two float32 slots per trainable weight
    saved          activations kept for the backward pass: from the first layer
                   with trainable weights to the output, each layer's inputs and
                   output (batch x shape x dtype size)
    frozen_peak    the largest live activations in the frozen region before it: the
                   max over its layers of inputs + output; for the augment + resize
                   layer, RESIZE_TEMPORARIES float32 copies of its output (four
                   gathered taps, their indices and weights)
    margin         MARGIN_FRACTION of the sum above, plus WORKSPACE_MIB of
                   convolution workspace

    peak = weights + gradients + optimizer + saved + frozen_peak + margin

Each term grows linearly in the batch but weights, gradients and optimizer, so the
largest batch under a budget follows in closed form; the tuner still searches it
like a measured one. The estimate is of the memory TensorFlow's allocator needs;
what XLA fuses away, allocator fragmentation and the skip tensors a block keeps live
are not modelled (the margin covers them). `make tune-gpu` measures the real peak
on a GPU to compare it with.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from effpipe.model import efficientnet

# Adam keeps two float32 slots (first and second moment) per trainable weight.
OPTIMIZER_SLOTS = 2
# The bilinear sampling holds four gathered taps, their int32 indices and their
# weights at the output size: about seven float32 copies of its output.
RESIZE_TEMPORARIES = 7
MARGIN_FRACTION = 0.10
WORKSPACE_MIB = 256
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak device memory of one train step, by term, in bytes."""

    batch_size: int
    weights: int
    gradients: int
    optimizer: int
    saved_activations: int
    frozen_peak: int
    margin: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.saved_activations
            + self.frozen_peak
            + self.margin
        )

    def as_mib(self) -> dict:
        """Every term and the total in MiB, for tables and JSON."""
        terms = dataclasses.asdict(self)
        del terms["batch_size"]
        return {**{k: round(v / MIB, 1) for k, v in terms.items()}, "total": self.total / MIB}


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """The per-model quantities the estimate needs, measured once per phase.

    Attributes:
      weight_bytes: every variable's bytes.
      cast_copy_bytes: 16-bit copies of the weights under mixed precision, else 0.
      trainable_bytes: the trainable variables' bytes.
      saved_bytes_per_image: activations kept for backward, per image.
      frozen_peak_bytes_per_image: the frozen region's largest live activations,
        per image.
    """

    weight_bytes: int
    cast_copy_bytes: int
    trainable_bytes: int
    saved_bytes_per_image: int
    frozen_peak_bytes_per_image: int

    def estimate(self, batch_size: int) -> MemoryEstimate:
        """The step's estimated peak at `batch_size`."""
        trainable_bytes = self.trainable_bytes
        partial = MemoryEstimate(
            batch_size=batch_size,
            weights=self.weight_bytes + self.cast_copy_bytes,
            gradients=trainable_bytes,
            optimizer=OPTIMIZER_SLOTS * trainable_bytes,
            saved_activations=batch_size * self.saved_bytes_per_image,
            frozen_peak=batch_size * self.frozen_peak_bytes_per_image,
            margin=0,
        )
        margin = int(MARGIN_FRACTION * partial.total) + WORKSPACE_MIB * MIB
        return dataclasses.replace(partial, margin=margin)


def measure_model(model: keras.Model) -> ModelMemory:
    """Reads the quantities of `ModelMemory` off a model built by `efficientnet.make_model`.

    The model's trainable flags must be those of the phase to estimate
    (`freezing.freeze_base` or `freezing.unfreeze_top_blocks`).
    """
    layers = _flat_layers(model)
    first_trainable = next(
        (index for index, layer in enumerate(layers) if layer.trainable_weights),
        len(layers),
    )
    saved = sum(
        _bytes_of(layer.input) + _bytes_of(layer.output) for layer in layers[first_trainable:]
    )
    frozen_peak = max(
        (_live_bytes(layer) for layer in layers[:first_trainable]),
        default=0,
    )
    weight_bytes = sum(_variable_bytes(v) for v in model.weights)
    compute_bytes = _itemsize(model.get_layer(efficientnet.BASE_NAME).compute_dtype)
    cast_copy_bytes = 0
    if compute_bytes < 4:
        cast_copy_bytes = sum(math.prod(v.shape) * compute_bytes for v in model.weights)
    return ModelMemory(
        weight_bytes=weight_bytes,
        cast_copy_bytes=cast_copy_bytes,
        trainable_bytes=sum(_variable_bytes(v) for v in model.trainable_weights),
        saved_bytes_per_image=saved,
        frozen_peak_bytes_per_image=frozen_peak,
    )


def _flat_layers(model: keras.Model) -> list:
    """The model's layers in input-to-output order, nested models expanded."""
    flat = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            flat.extend(_flat_layers(layer))
        else:
            flat.append(layer)
    return flat


def _live_bytes(layer) -> int:
    if layer.name == "resize":
        # Sampling runs in float32 whatever the compute dtype.
        output_elements = _bytes_of(layer.output) // _itemsize(layer.output.dtype)
        return _bytes_of(layer.input) + RESIZE_TEMPORARIES * 4 * output_elements
    return _bytes_of(layer.input) + _bytes_of(layer.output)


def _bytes_of(tensors) -> int:
    """Bytes per image of a symbolic tensor or a (nested) list of them."""
    if isinstance(tensors, (list, tuple)):
        return sum(_bytes_of(t) for t in tensors)
    if isinstance(tensors, dict):
        return sum(_bytes_of(t) for t in tensors.values())
    return math.prod(tensors.shape[1:]) * _itemsize(tensors.dtype)


def _variable_bytes(variable) -> int:
    return math.prod(variable.shape) * _itemsize(variable.dtype)


def _itemsize(dtype) -> int:
    """Bytes per element of a Keras or TensorFlow dtype (bfloat16 included)."""
    return tf.as_dtype(keras.backend.standardize_dtype(dtype)).size
