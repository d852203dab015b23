"""The model: uint8 source images in, class probabilities out.

    uint8 (S, S, 3) -> augment + resize to the model resolution, in one bilinear
    pass (identity when not training) -> EfficientNet base -> head
    -> Dense softmax (float32)

Heads:
  pooled    GAP -> BN -> Dropout -> Dense (keras-io's order; cheaper, and its pooled
            features can be cached)
  notebook  BN -> Dropout -> GAP -> Dense (the original notebook's order)
  keras     GAP -> Dropout -> Dense (the top Keras' EfficientNet is built with;
            its pooled features can be cached too)

The Keras EfficientNets include their own rescaling and normalisation: they take
0..255 floats. A pretrained base, from the download or a file, is the network Keras
builds for weights="imagenet", whose stem scales once more after its Normalization;
a base trained from scratch is the plain one. The base is one nested sub-model,
named BASE_NAME, so phases can freeze and unfreeze it (`effpipe.model.freezing`).
"""

import json
import math
import os

import keras

from effpipe import variants
from effpipe.errors import UsageError
from effpipe.model import augment

BASE_NAME = "base"


# The Keras versions whose EfficientNet stem `_imagenet_network` is written against.
SUPPORTED_KERAS = ">=3.15,<3.16"


# ImageNet's per-channel standard deviations (R, G, B) of 0..1 pixels, as Keras'
# EfficientNet uses them.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)

# The stochastic-depth rate Keras' EfficientNets are built with (their
# drop_connect_rate): block b of B drops its residual branch at this rate * b / B.
KERAS_STOCHASTIC_DEPTH = 0.2


def make_base(
    variant: str, image_size: int, weights: str, *, random_weights: bool = False
) -> keras.Model:
    """Builds the EfficientNet base without its top.

    Every pretrained base, whatever the weights' source, is the network Keras builds
    for `weights="imagenet"` (see `_imagenet_network`); `weights="none"` builds the
    plain one, which lacks the stem's second ImageNet scaling.

    Args:
      variant: a key of `variants.VARIANTS`.
      image_size: input side in pixels.
      weights: "imagenet" (downloaded by Keras on first use), "none" (random
        initialisation) or the path of a Keras weights file for this variant's
        no-top base (`.weights.h5`, or a legacy `.h5` such as Keras'
        efficientnetb5_notop.h5). A file is read as weights trained on inputs
        normalised as ImageNet's: Keras' own, or a base saved from a pretrained one.
      random_weights: build the network `weights` asks for, randomly initialised,
        without fetching or reading any file.

    Returns:
      The base model, named BASE_NAME.

    Raises:
      UsageError: weights that cannot be fetched, found or loaded into this variant.
    """
    keras_name = variants.VARIANTS[variant].keras_constructor
    constructor = getattr(keras.applications, keras_name)
    input_shape = (image_size, image_size, 3)
    if weights == "none":
        return constructor(include_top=False, weights=None, input_shape=input_shape, name=BASE_NAME)
    if random_weights:
        return _imagenet_network(constructor, input_shape)
    if weights == "imagenet":
        try:
            # Keras names the file it downloads after the model ("<name>_notop.h5"),
            # so the base keeps the constructor's name until its weights are in.
            base = constructor(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as error:  # Keras raises a bare Exception on a failed fetch.
            raise UsageError(
                f"could not fetch the ImageNet weights for {variant} ({error}): download "
                f"{keras_name.lower()}_notop.h5 elsewhere and pass --weights=PATH, or "
                "train from scratch with --weights=none"
            ) from error
        base.name = BASE_NAME
        return base
    if not os.path.isfile(weights):
        raise UsageError(
            f"weights file {weights} does not exist: pass --weights=imagenet, none or the "
            "path of a no-top weights file"
        )
    base = _imagenet_network(constructor, input_shape)
    try:
        base.load_weights(weights)
    except Exception as error:  # h5py and Keras raise several types for a bad file.
        raise UsageError(
            f"weights file {weights} does not fit the {variant} base "
            f"({type(error).__name__}: {_first_sentence(error)}): pass the no-top weights "
            f"of {variant}"
        ) from error
    return base


def _first_sentence(error: Exception, max_chars: int = 200) -> str:
    """The start of an error's message, for one line: Keras follows "A total of N
    objects could not be loaded." with every layer that did not load."""
    sentence = " ".join(str(error).split()).split(". ")[0]
    return sentence if len(sentence) <= max_chars else sentence[: max_chars - 3] + "..."


def _imagenet_network(constructor, input_shape: tuple[int, int, int]) -> keras.Model:
    """The base Keras builds for weights="imagenet", randomly initialised.

    Keras' EfficientNet stem is Rescaling(1/255) -> Normalization -> stem_conv_pad.
    Only when its constructor downloads the ImageNet weights does it insert, after
    the Normalization, a Rescaling by 1/sqrt(stddev): the original models divide by
    the variance, not the standard deviation (tensorflow/tensorflow#49930). The
    pretrained tensors expect that scale wherever they come from; without it
    stem_conv's output is off by half (measured: 52% relative difference).

    The inserted layer has no weights, so this network stores the same tensors under
    the same paths as the plain one, and any file of the base's tensors loads into it.
    It is built from the plain base's config with that layer inserted: the public
    config format, no download and no file.

    Raises:
      UsageError: a Keras whose EfficientNet stem is not laid out as above.
    """
    plain = constructor(include_top=False, weights=None, input_shape=input_shape, name=BASE_NAME)
    # A JSON round trip turns the config's tuples into lists that can be edited.
    config = json.loads(json.dumps(plain.get_config()))
    layers = config["layers"]
    normalizations = [i for i, layer in enumerate(layers) if layer["class_name"] == "Normalization"]
    consumers = [layer for layer in layers if layer["name"] == "stem_conv_pad"]
    if len(normalizations) != 1 or len(consumers) != 1:
        raise _unsupported_keras("no single Normalization and stem_conv_pad")
    normalization_name = layers[normalizations[0]]["name"]
    histories = list(_keras_histories(consumers[0]["inbound_nodes"]))
    if [history[0] for history in histories] != [normalization_name]:
        raise _unsupported_keras(f"stem_conv_pad reads {histories}, not {normalization_name}")
    rescaling = keras.layers.Rescaling([1.0 / math.sqrt(s) for s in _IMAGENET_STDDEV_RGB])
    entry = keras.saving.serialize_keras_object(rescaling)
    entry["name"] = rescaling.name
    # The new layer reads what stem_conv_pad read; stem_conv_pad reads the new layer.
    entry["inbound_nodes"] = json.loads(json.dumps(consumers[0]["inbound_nodes"]))
    histories[0][0] = rescaling.name
    layers.insert(normalizations[0] + 1, entry)
    return keras.Model.from_config(config)


def _keras_histories(value):
    """The `keras_history` entries ([layer name, node, tensor]) in serialised inputs."""
    if isinstance(value, dict):
        if "keras_history" in value:
            yield value["keras_history"]
        for item in value.values():
            yield from _keras_histories(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keras_histories(item)


def _unsupported_keras(detail: str) -> UsageError:
    return UsageError(
        f"keras {keras.__version__} lays out the EfficientNet stem differently ({detail}) "
        f"from the keras {SUPPORTED_KERAS} effpipe builds its pretrained bases for: "
        f"install keras {SUPPORTED_KERAS}"
    )


def make_model(
    *,
    variant: str,
    image_size: int,
    source_size: tuple[int, int],
    num_classes: int,
    weights: str = "imagenet",
    head: str = "pooled",
    dropout: float = 0.2,
    augment_config: augment.AugmentConfig | None = None,
    seed: int = 0,
    compile_augmentation: bool = True,
    random_weights: bool = False,
    synchronized_batch_norm: bool = False,
    stochastic_depth: float = KERAS_STOCHASTIC_DEPTH,
    zero_init_residual: bool = True,
) -> keras.Model:
    """Builds the full classifier on uint8 images at source resolution.

    The global Keras dtype policy (set by the caller for mixed precision) applies
    to every layer but the final Dense, which stays float32 so the softmax and the
    loss are computed in float32. The augment + resize layer, named "resize",
    samples in float32 and hands the base the compute dtype.

    Args:
      variant: a key of `variants.VARIANTS`.
      image_size: the model resolution in pixels.
      source_size: (height, width) of the uint8 input images.
      num_classes: outputs of the final Dense layer.
      weights: see `make_base`.
      head: "pooled", "notebook" or "keras" (see the module docstring).
      dropout: dropout rate of the head.
      augment_config: the random transform applied to training batches on the
        device, or None for a plain resize in training too.
      seed: keys the augmentation's random draws (with the step and replica).
      compile_augmentation: let the augment + resize layer compile its sampling
        with XLA (False under --debug_numerics, whose checks XLA cannot run).
      random_weights: initialise the base randomly but build the model as
        `weights` asks otherwise (the pretrained network, run in inference mode):
        the same graph and memory without fetching or reading weights (the
        batch-size tuner; a copy that `copy_weights` then fills).
      synchronized_batch_norm: the head's BatchNormalization takes its batch
        statistics over all replicas of a distribution strategy, so that several
        replicas train the head as one device does on the same global batch.
        The base's BatchNormalization is frozen (or, from scratch, per replica).
      stochastic_depth: with weights="none", the rate at which the last block
        drops its residual branch in training (earlier blocks linearly less, as
        Keras builds them at KERAS_STOCHASTIC_DEPTH); 0 turns it off. A
        pretrained base runs without stochastic depth.
      zero_init_residual: with weights="none", start every residual block as
        the identity (`zero_init_residual_branches`).

    Returns:
      An uncompiled Keras model whose base is frozen.
    """
    inputs = keras.Input(shape=(*source_size, 3), dtype="uint8", name="image")
    resized = augment.AugmentResize(
        image_size,
        augment=augment_config,
        seed=seed,
        compile_sampling=compile_augmentation,
        name="resize",
    )(inputs)
    base = make_base(variant, image_size, weights, random_weights=random_weights)
    base.trainable = False
    if weights == "none":
        # Trained from scratch: the base follows the training flag, so the
        # BatchNormalization layers that phase 2 unfreezes learn batch statistics.
        set_stochastic_depth(base, stochastic_depth)
        if zero_init_residual:
            zero_init_residual_branches(base)
        features = base(resized)
    else:
        # A pretrained base always runs in inference mode, as in keras-io's
        # fine-tuning example: BatchNormalization keeps its pretrained moving
        # statistics and the blocks' stochastic-depth dropout is off, in both
        # phases. Unfrozen layers still receive gradients.
        features = base(resized, training=False)
        # Keras 3 hands a nested model the outer call's training flag even where the
        # graph was built with training=False (measured on Keras 3.15: a Dropout in
        # a nested model drops under model(x, training=True)). Frozen
        # BatchNormalization runs in inference mode anyway; the stochastic-depth
        # Dropout layers would not, so their rate is set to 0.
        disable_stochastic_depth(base)
    if head == "pooled":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
        x = keras.layers.BatchNormalization(name="head_bn", synchronized=synchronized_batch_norm)(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    elif head == "keras":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    elif head == "notebook":
        x = keras.layers.BatchNormalization(name="head_bn", synchronized=synchronized_batch_norm)(
            features
        )
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    else:
        raise UsageError(f"unknown head {head!r}: choose pooled or notebook")
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"effpipe_{variant}")


def disable_stochastic_depth(base: keras.Model) -> None:
    """Turns off the base's stochastic depth (its blocks' Dropout layers) in training too.

    A Dropout of rate 0 returns its input and draws no random numbers; its seed
    generator stays, so saved states keep their layout.
    """
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def set_stochastic_depth(base: keras.Model, rate: float) -> None:
    """Scales the freshly built base's stochastic depth so its last block drops at `rate`.

    Keras builds block b of B with a Dropout (on the residual branch, one draw per
    example) of rate KERAS_STOCHASTIC_DEPTH * b / B; each is scaled by
    rate / KERAS_STOCHASTIC_DEPTH, keeping Keras' linear rise through the blocks.
    """
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = layer.rate * rate / KERAS_STOCHASTIC_DEPTH


def zero_init_residual_branches(base: keras.Model) -> int:
    """Starts every residual block of a randomly initialised base as the identity.

    The last BatchNormalization of each block whose output is added to its input
    (Keras names them blockNx_project_bn, beside blockNx_add) gets scale 0, so the
    branch adds nothing until training grows it: the network starts as shallow as
    its stages' first blocks, and gradients reach the stem undamped (Goyal et al.,
    "Accurate, Large Minibatch SGD", 2017; timm's zero_init_last). WORKSPACE.md's
    demo table measures what it does from scratch.

    Returns:
      How many blocks were zeroed (9 in B0).

    Raises:
      UsageError: a Keras whose EfficientNet blocks are named otherwise.
    """
    names = {layer.name for layer in base.layers}
    zeroed = 0
    for layer in base.layers:
        if layer.name.endswith("_project_bn") and layer.name[: -len("project_bn")] + "add" in names:
            layer.gamma.assign(keras.ops.zeros_like(layer.gamma))
            zeroed += 1
    if not zeroed:
        raise _unsupported_keras("no blockNx_project_bn beside a blockNx_add")
    return zeroed


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Gives `target`, a model built like `source`, the weights of `source`.

    `target.set_weights(source.get_weights())` alone is not enough: Keras'
    Normalization layer (the base's input statistics) computes with tensors it
    derives from its variables when it is built or loads a file, and set_weights
    assigns the variables only. A copy of a pretrained model would normalise its
    inputs with the random base's mean 0 and variance 1 (measured on Keras 3.15).
    """
    target.set_weights(source.get_weights())
    refresh_input_statistics(target)


def refresh_input_statistics(model: keras.Model) -> None:
    """Makes the base's Normalization compute with its variables' current values.

    Call after assigning a model's weights other than by `load_weights` (see
    `copy_weights`).
    """
    for layer in get_base(model).layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def get_base(model: keras.Model) -> keras.Model:
    """The nested EfficientNet base of a model built by `make_model`."""
    return model.get_layer(BASE_NAME)
