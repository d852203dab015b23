"""Which layers each phase trains: the base's blocks, frozen and unfrozen.

Phase 1 freezes the whole base. Phase 2 unfreezes whole blocks from the top (a
block's skip connection spans its layers) and the top conv; BatchNormalization stays
frozen, in inference mode, except in a base trained from scratch.
"""

import re

import keras

from effpipe.errors import UsageError
from effpipe.model import efficientnet

_BLOCK_PATTERN = re.compile(r"^block(\d+[a-z])_")


def block_names(base: keras.Model) -> list[str]:
    """The base's blocks ("1a", "2a", "2b", ..., "7a") in input-to-output order.

    A block is one MBConv unit with its skip connection; unfreezing whole blocks
    keeps a residual branch and its shortcut in the same state.
    """
    names = []
    for layer in base.layers:
        match = _BLOCK_PATTERN.match(layer.name)
        if match and match.group(1) not in names:
            names.append(match.group(1))
    return names


def check_unfreeze_blocks(model: keras.Model, num_blocks: int) -> list[str]:
    """Returns the base's blocks; raises UsageError when `num_blocks` exceeds them.

    The trainer calls it before phase 1, so a bad --unfreeze_blocks fails in
    seconds, not after hours of phase 1.
    """
    blocks = block_names(efficientnet.get_base(model))
    if not 0 <= num_blocks <= len(blocks):
        raise UsageError(
            f"--unfreeze_blocks={num_blocks} is more than the {len(blocks)} blocks of "
            f"this base: use 0..{len(blocks)}"
        )
    return blocks


def freeze_base(model: keras.Model) -> None:
    """Phase 1: the whole base frozen; frozen BatchNormalization runs in inference mode."""
    efficientnet.get_base(model).trainable = False


def unfreeze_top_blocks(
    model: keras.Model, num_blocks: int, *, freeze_batch_norm: bool = True
) -> list[str]:
    """Phase 2: unfreezes the top `num_blocks` blocks and the top conv of the base.

    Every BatchNormalization layer stays frozen (inference mode, pretrained moving
    statistics kept), as the recipe requires; everything below the unfrozen blocks
    stays frozen. The caller must recompile the model afterwards.

    Args:
      model: a model built by `make_model`.
      num_blocks: how many blocks to unfreeze, counted from the top.
      freeze_batch_norm: keep BatchNormalization frozen. Only a base trained from
        scratch (`--weights=none`) passes False: it has no pretrained statistics to
        protect, and a deep EfficientNet whose untrained BatchNormalization is
        frozen does not learn (measured on the shapes demo: chance accuracy after
        3 epochs of 10,000 images, against 31% with BatchNormalization training).

    Returns:
      The names of the unfrozen blocks.

    Raises:
      UsageError: when num_blocks exceeds the base's block count.
    """
    base = efficientnet.get_base(model)
    blocks = check_unfreeze_blocks(model, num_blocks)
    unfrozen = blocks[len(blocks) - num_blocks :]
    # Setting trainable on the nested model recurses into every layer; the loop
    # then freezes again what must stay frozen.
    base.trainable = True
    for layer in base.layers:
        match = _BLOCK_PATTERN.match(layer.name)
        in_unfrozen_region = layer.name.startswith("top_") or (
            match is not None and match.group(1) in unfrozen
        )
        is_batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = in_unfrozen_region and not (is_batch_norm and freeze_batch_norm)
    return unfrozen


def set_phase(
    model: keras.Model, phase: int, *, unfreeze_blocks: int, from_scratch: bool
) -> list[str]:
    """Sets the trainable flags of `phase` (trainer and batch-size tuner).

    Phase 1 freezes the whole base. Phase 2 unfreezes the top `unfreeze_blocks`
    blocks and the top conv; BatchNormalization stays frozen, except in a base
    trained from scratch (`from_scratch`, --weights=none), which has no pretrained
    statistics to keep. Recompile afterwards.

    Returns:
      The unfrozen blocks (none in phase 1).
    """
    if phase == 1:
        freeze_base(model)
        return []
    return unfreeze_top_blocks(model, unfreeze_blocks, freeze_batch_norm=not from_scratch)
