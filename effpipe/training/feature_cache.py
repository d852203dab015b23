"""Phase 1 on cached features: the frozen base's pooled output, computed once.

In phase 1 the base is frozen; without augmentation it maps an image to the same
pooled features in every epoch, and only the head trains. So the pooled features
(the output of the `head_pool` layer, FEATURE_LAYER) of the train and validation
images are computed once, by the full model's own layers in inference mode under
the run's precision, resolution and XLA setting, and a head model built from the
SAME layer objects (head_bn -> head_dropout -> predictions) trains on them. Its
weights, its Dropout's seed generator and its optimizer are the full model's, so
the full model holds the trained head and phase 2 continues from it as usual.

    WORKDIR/cache/phase1_features.npz   train (N, F) and validation (M, F) features,
                                        float32, row i from image i of the split,
                                        and the fingerprint of what made them

The file is written atomically; a resumed run reuses it when its fingerprint (the
run's configuration, precision policy and example counts) matches and computes it
again otherwise. A killed pass leaves no file (nothing is written before both
splits are computed); a file that does not read back (damaged on disk) is computed
again, with a warning.
"""

import dataclasses
import json
import os
import time
import zipfile

import keras
import numpy as np
from absl import logging

from effpipe import config_checks, faults, run_dir
from effpipe.config import TrainConfig
from effpipe.errors import UsageError
from effpipe.model import efficientnet

FEATURE_LAYER = "head_pool"
CACHE_FILE = run_dir.FEATURE_CACHE_FILE


@dataclasses.dataclass
class Features:
    """The pooled features of phase 1.

    Attributes:
      train: (N, F) float32, row i from training image i (unshuffled split order).
      validation: (M, F) float32, likewise.
      reused: read from an earlier run's file rather than computed.
      seconds: wall time to compute or read them.
    """

    train: np.ndarray
    validation: np.ndarray
    reused: bool
    seconds: float

    @property
    def megabytes(self) -> float:
        return (self.train.nbytes + self.validation.nbytes) / 1e6


def make_feature_model(model: keras.Model) -> keras.Model:
    """The full model from its uint8 input to the pooled features (FEATURE_LAYER).

    It shares every layer with `model`: the same resize, base and weights.
    """
    return keras.Model(model.input, model.get_layer(FEATURE_LAYER).output, name="features")


def make_head_model(model: keras.Model) -> keras.Model:
    """A model from pooled features to class probabilities, made of `model`'s head layers.

    The layers after FEATURE_LAYER are the very objects of `model`: training this
    model trains the full model's head, and its Dropout draws from the same seed
    generator. The input is float32 (how the features are stored); under a mixed
    policy the first layer casts it to the compute dtype the features came in, which
    float32 holds exactly.

    Raises:
      ValueError: the model's head does not start with FEATURE_LAYER on the base
        (the notebook head pools last).
    """
    layers = model.layers
    pool = model.get_layer(FEATURE_LAYER)
    start = layers.index(pool) + 1
    if layers[start - 2].name != efficientnet.BASE_NAME:
        raise ValueError(
            "only the pooled and keras heads (pooling right after the base) have cacheable features"
        )
    features = keras.Input(shape=pool.output.shape[1:], dtype="float32", name="features")
    outputs = features
    for layer in layers[start:]:
        outputs = layer(outputs)
    return keras.Model(features, outputs, name=f"{model.name}_head")


def load_or_compute(path: str, fingerprint: dict, compute_train, compute_validation) -> Features:
    """The features stored at `path` if they match `fingerprint`, else computed and stored.

    Args:
      path: the cache file (`.npz`), written atomically.
      fingerprint: JSON-serialisable description of what determines the features.
      compute_train: returns the (N, F) training features.
      compute_validation: returns the (M, F) validation features.

    Returns:
      The features, float32.
    """
    start = time.perf_counter()
    expected = json.dumps(fingerprint, sort_keys=True)
    stored = _read(path, expected)
    if stored is not None:
        train, validation = stored
        return Features(train, validation, True, time.perf_counter() - start)
    train = np.asarray(compute_train(), dtype=np.float32)
    faults.kill_at("feature_cache")
    validation = np.asarray(compute_validation(), dtype=np.float32)
    run_dir.write_atomically(
        path,
        lambda temporary: np.savez(
            temporary, train=train, validation=validation, fingerprint=np.array(expected)
        ),
    )
    return Features(train, validation, False, time.perf_counter() - start)


def _read(path: str, expected_fingerprint: str):
    """(train, validation) from `path`, or None when missing or made by something else."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != expected_fingerprint:
                logging.info("%s was computed for another run or setup: computing again", path)
                return None
            return stored["train"], stored["validation"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logging.warning("%s does not read back (%s): computing it again", path, error)
        return None


def log_features(features: Features, path: str) -> None:
    """One line: the feature size per image, the images, megabytes, and where from."""
    logging.info(
        "phase-1 features: %d floats per image (float32), %d train + %d validation "
        "images, %.1f MB, %s %s in %.1f s",
        features.train.shape[1],
        len(features.train),
        len(features.validation),
        features.megabytes,
        "read from" if features.reused else "computed once and saved to",
        path,
        features.seconds,
    )


def resolve(config: TrainConfig, distributed: bool = False) -> tuple[bool, str]:
    """Resolves --phase1_feature_cache, with the reason for the log.

    The cache applies when the base's pooled output of an image is the same in every
    phase-1 epoch: no random augmentation before the base, and a head that pools
    first (pooled). "on" where it cannot apply is refused at validation. auto also
    leaves it off for a base trained from scratch (--weights=none): that base follows
    the training flag, so its stochastic depth changes the features every epoch and
    the cache (its inference output) would train another head; "on" accepts that.
    Under a distribution strategy it is off: the cache's head model, which shares
    the full model's layers, is built and tested on one device only.

    Args:
      config: the run configuration.
      distributed: the run resolved to a strategy other than the default one.

    Returns:
      (on, reason).
    """
    if config.phases.phase1_feature_cache == "off":
        return False, "phase-1 feature cache off (--phase1_feature_cache=off)"
    if config.phases.phase1_feature_cache == "on":
        if distributed:
            raise UsageError(
                f"--phase1_feature_cache=on needs one device, and --strategy={config.distribution.strategy} "
                "resolved to several replicas: pass --phase1_feature_cache=auto or off"
            )
        return True, "phase-1 feature cache on (--phase1_feature_cache=on)"
    if distributed:
        return False, "phase-1 feature cache off (auto: it runs on one device, without a strategy)"
    if config.augmentation.augment:
        return False, "phase-1 feature cache off (auto: augmentation changes the features)"
    if config.model.head not in config_checks.POOLING_HEADS:
        return False, f"phase-1 feature cache off (auto: the {config.model.head} head pools last)"
    if config.model.weights == "none":
        return False, (
            "phase-1 feature cache off (auto: a base trained from scratch draws stochastic "
            "depth in training, so its features change every epoch)"
        )
    return True, (
        f"phase-1 feature cache on (auto: no augmentation, {config.model.head} head, "
        "pretrained base)"
    )
