"""Exporting a trained model as a SavedModel that serves encoded images by class name.

    WORKDIR/export/      tf.saved_model.load(path) in any TensorFlow process

Signatures (both return the same outputs):
  serving_default(images: string [N])      encoded JPEG, PNG, GIF or BMP bytes of any
                                           size; grayscale, palette and RGBA images are
                                           converted to RGB
  serve_images(images: uint8 [N, H, W, 3]) decoded images of any size

and class_names() returns every class name, in class order.

Each image is brought to the run's source size as training images were
(effpipe.data.decode: the same decoder, --source_crop, resize, rounded to uint8), then the model takes it to its resolution
and classifies it. Outputs:
  classes            string [N, k]   the top-k class names, most probable first
  class_ids          int32 [N, k]
  probabilities      float32 [N, k]
  all_probabilities  float32 [N, num_classes]

The SavedModel holds the traced graph and the weights: loading it needs TensorFlow
only, not effpipe or Keras.

It computes in float32 without XLA, whatever the run's precision and --xla: the
export traces a serving copy of the trained model (`make_serving_model`), the same
layers and weights under the float32 dtype policy, with the resize layer's sampling
left uncompiled. Why: TF Serving and CPU-only servers may be built without XLA's JIT
and then cannot run a function marked `_XlaMustCompile` (the layer's compiled
sampling); and on CPU float16 kernels are slow or missing, bfloat16 ones fast only
with bfloat16 instructions. Keras keeps a mixed-precision model's variables in
float32, so no weight is rounded; each layer of the copy computes what the trained
model's does, without its float16/bfloat16 rounding.
"""

import keras
import tensorflow as tf
from absl import logging

from effpipe import run_dir
from effpipe.data import decode
from effpipe.model import augment, efficientnet

EXPORT_DIR = "export"


class ServingModule(tf.Module):
    """The model with its pre- and post-processing, as traced TensorFlow functions.

    Args:
      model: a model built by `efficientnet.make_model` (uint8 source images in).
      class_names: one name per class.
      top_k: classes returned per image (at most the number of classes).
      crop: the run's --source_crop.
    """

    def __init__(self, model: keras.Model, class_names, top_k: int = 5, crop: str = "resize"):
        super().__init__()
        self.crop = crop
        self.model = model
        self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
        self.top_k = min(top_k, len(class_names))
        self.source_size = int(model.input.shape[1])
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )
        self.serve_images = tf.function(
            self._serve_images,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )
        self.get_class_names = tf.function(
            lambda: {"class_names": tf.identity(self.class_names)}, input_signature=[]
        )

    def _serve_bytes(self, images):
        decoded = tf.map_fn(
            lambda encoded: decode.decode_to_size(encoded, self.source_size, self.crop),
            images,
            fn_output_signature=tf.TensorSpec([self.source_size, self.source_size, 3], tf.uint8),
        )
        # The uint8 signature's function: the model is traced once for both.
        return self.serve_images(decoded)

    def _serve_images(self, images):
        return self._classify(decode.resize_to_size(images, self.source_size, self.crop))

    def _classify(self, images):
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        top_probabilities, top_ids = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "classes": tf.gather(self.class_names, top_ids),
            "class_ids": top_ids,
            "probabilities": top_probabilities,
            "all_probabilities": probabilities,
        }


def make_serving_model(model: keras.Model) -> keras.Model:
    """A float32 copy of `model` that runs without XLA, holding its weights.

    Every layer, the nested base's included, is rebuilt from its config under the
    float32 dtype policy, the resize layer with `compile_sampling=False`, and takes
    the value of its counterpart's every weight (the resize layer's int64 step
    counter too). The copy is not compiled: it has no optimizer, so the export
    holds no optimizer state.

    Args:
      model: a model built by `efficientnet.make_model`, under any dtype policy; left
        unchanged.

    Returns:
      The uncompiled copy; the global dtype policy is as before the call.
    """
    # A model of the same layers that was never compiled: clone_model compiles its
    # copy like its argument, which would build optimizer slots into the export.
    uncompiled = keras.Model(model.input, model.output, name=model.name)
    previous_policy = keras.config.dtype_policy()
    # The nested base's own Functional model takes the global policy, not a config.
    keras.config.set_dtype_policy("float32")
    try:
        serving = keras.models.clone_model(
            uncompiled, clone_function=_float32_uncompiled_layer, recursive=True
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    trained, copied = model.weights, serving.weights
    # Weights pair up by path, shape and dtype, not by position alone: set_weights
    # checks shapes only, and a base's many equal-shaped BatchNormalization vectors
    # would take each other's values silently.
    mismatched = [
        (a.path, b.path)
        for a, b in zip(trained, copied)
        if (a.path, tuple(a.shape), a.dtype) != (b.path, tuple(b.shape), b.dtype)
    ]
    if len(trained) != len(copied) or mismatched:
        raise RuntimeError(
            f"the serving copy's {len(copied)} weights do not match the model's "
            f"{len(trained)}; first mismatches: {mismatched[:3]}"
        )
    for source, target in zip(trained, copied):
        target.assign(source.value)
    # Assigned variables alone leave the base's Normalization on its build-time
    # statistics (mean 0, variance 1); the trained model's must serve.
    efficientnet.refresh_input_statistics(serving)
    return serving


def _float32_uncompiled_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new layer like `layer` under the float32 policy, its sampling not XLA-compiled."""
    config = layer.get_config()
    config["dtype"] = "float32"
    if isinstance(layer, augment.AugmentResize):
        config["compile_sampling"] = False
    return layer.__class__.from_config(config)


def export_model(
    model: keras.Model, class_names, path: str, top_k: int = 5, *, crop: str = "resize"
) -> None:
    """Writes the SavedModel of `model` to the folder `path`, atomically.

    The SavedModel traces `make_serving_model(model)`: float32 and free of XLA
    whatever the policy `model` was built and trained under.

    Args:
      model: a trained model built by `efficientnet.make_model`.
      class_names: one name per class, indexed by label.
      path: the export folder (replaced if it exists).
      top_k: classes each signature returns per image.
      crop: the run's --source_crop, applied to served images as in training.
    """
    module = ServingModule(make_serving_model(model), class_names, top_k, crop)
    signatures = {
        "serving_default": module.serve_bytes,
        "serve_images": module.serve_images,
        "class_names": module.get_class_names,
    }
    # Serving needs no gradients: not tracing them halves the time to save.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    previous_verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs every saved function.
    try:
        run_dir.write_directory_atomically(
            path,
            lambda folder: tf.saved_model.save(
                module, folder, signatures=signatures, options=options
            ),
        )
    finally:
        logging.set_verbosity(previous_verbosity)


def load(path: str):
    """`tf.saved_model.load` of an export, without TensorFlow's warning that its
    functions carry no gradients (serving never asks for them)."""
    previous_verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return tf.saved_model.load(path)
    finally:
        logging.set_verbosity(previous_verbosity)
