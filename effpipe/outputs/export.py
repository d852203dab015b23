"""Exporting a trained model as a SavedModel that serves images by class name, and
converting that export to TFLite.

    WORKDIR/export/      tf.saved_model.load(path) in any TensorFlow process, or a
                         TF1 session load (TF Serving's loader, saved_model_cli run)
    WORKDIR/export.tflite  `write_tflite`, run by `python -m effpipe.export_tflite`

Signatures (all return the same outputs):
  serving_default(images: string [N])      encoded JPEG, PNG, GIF or BMP bytes of any
                                           size; grayscale, palette and RGBA images are
                                           converted to RGB
  serve_images(images: uint8 [N, H, W, 3]) decoded images of any size
  serve_source_images(images: uint8 [N, S, S, 3])
                                           images already at the run's source size S:
                                           the model alone, no resize (what TFLite runs)

and class_names() returns every class name, in class order.

Each image is brought to the run's source size as training images were
(effpipe.data.decode: the same decoder, --source_crop, resize, rounded to uint8), then the model takes it to its resolution
and classifies it. Outputs:
  classes            string [N, k]   the top-k class names, most probable first
  class_ids          int32 [N, k]
  probabilities      float32 [N, k]
  all_probabilities  float32 [N, num_classes]

The SavedModel holds the traced graph and the weights: loading it needs TensorFlow
only, not effpipe or Keras. Keras' exporter (`keras.export.ExportArchive`) writes it:
it saves the `tf.Variable`s that the traced functions read, so the restore op that
TF Serving's loader runs fills, by name, the variables the signatures read. A
`tf.Module` holding the Keras model, saved with `tf.saved_model.save`, would not
serve there: each Keras variable is saved as a second copy of its `tf.Variable`,
and the restore op fills only the copies. `tf.saved_model.load` binds functions to
variables by object and never shows it; a session load finds the variables that
the functions read uninitialized.

It computes in float32 without XLA, whatever the run's precision and --xla: the
export traces a serving copy of the trained model (`make_serving_model`), the same
layers and weights under the float32 dtype policy, with the resize layer's sampling
left uncompiled. Why: TF Serving and CPU-only servers may be built without XLA's JIT
and then cannot run a function marked `_XlaMustCompile` (the layer's compiled
sampling); and on CPU float16 kernels are slow or missing, bfloat16 ones fast only
with bfloat16 instructions. Keras keeps a mixed-precision model's variables in
float32, so no weight is rounded; each layer of the copy computes what the trained
model's does, without its float16/bfloat16 rounding.

TFLite converts `serve_source_images` only: the other signatures' resize has an
antialiased branch (`ScaleAndTranslate`) that TFLite has no kernel for, builtin or
TF Select. A TFLite caller resizes its images to S x S itself.
"""

import pathlib

import keras
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import saved_model_pb2

from effpipe import run_dir
from effpipe.data import decode
from effpipe.errors import UsageError
from effpipe.model import augment, efficientnet

EXPORT_DIR = "export"
# The signature that TFLite runs, and its file beside the export folder.
TFLITE_SIGNATURE = "serve_source_images"
TFLITE_FILE = "export.tflite"


def make_archive(
    model: keras.Model, class_names, top_k: int = 5, crop: str = "resize"
) -> keras.export.ExportArchive:
    """The serving signatures of `model`, with its pre- and post-processing.

    Args:
      model: a model built by `efficientnet.make_model` (uint8 source images in).
      class_names: one name per class.
      top_k: classes returned per image (at most the number of classes).
      crop: the run's --source_crop.

    Returns:
      The archive, ready for `write_out`.
    """
    source_size = int(model.input.shape[1])
    # A constant, not a variable: the names never change after the export.
    names = tf.constant(list(class_names))
    archive = keras.export.ExportArchive()
    # serving_default calls serve_images' function, which calls serve_source_images':
    # the model is traced once.
    serve_source_images = archive.add_endpoint(
        "serve_source_images",
        _make_classify(model, names, min(top_k, len(class_names))),
        input_signature=[_images_spec(source_size)],
    )
    serve_images = archive.add_endpoint(
        "serve_images",
        lambda images: serve_source_images(decode.resize_to_size(images, source_size, crop)),
        input_signature=[_images_spec(None)],
    )

    def decode_all(encoded_images):
        return tf.map_fn(
            lambda encoded: decode.decode_to_size(encoded, source_size, crop),
            encoded_images,
            fn_output_signature=tf.TensorSpec([source_size, source_size, 3], tf.uint8),
        )

    archive.add_endpoint(
        "serving_default",
        lambda images: serve_images(decode_all(images)),
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    archive.add_endpoint(
        "class_names", lambda: {"class_names": tf.identity(names)}, input_signature=[]
    )
    return archive


def _images_spec(size: int | None) -> tf.TensorSpec:
    """A batch of uint8 RGB images of side `size` (None: any height and width)."""
    return tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")


def _make_classify(model: keras.Model, names: tf.Tensor, top_k: int):
    """The function from uint8 images at the source size to the signatures' outputs."""

    def classify(images):
        probabilities = tf.cast(model(images, training=False), tf.float32)
        top_probabilities, top_ids = tf.math.top_k(probabilities, k=top_k)
        return {
            "classes": tf.gather(names, top_ids),
            "class_ids": top_ids,
            "probabilities": top_probabilities,
            "all_probabilities": probabilities,
        }

    return classify


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
    archive = make_archive(make_serving_model(model), class_names, top_k, crop)
    # Serving needs no gradients: not tracing them halves the time to save.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    previous_verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs every saved function.
    try:
        run_dir.write_directory_atomically(
            path, lambda folder: archive.write_out(folder, options=options, verbose=False)
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


def write_tflite(export_dir: str, path: str, *, float16: bool = False) -> int:
    """Converts the export's `serve_source_images` signature to a TFLite file.

    The file holds that one signature, under its name, with the same inputs and
    outputs (class names included): uint8 [N, S, S, 3] images at the run's source
    size in.

    Args:
      export_dir: a folder written by `export_model`.
      path: the .tflite file to write (replaced if it exists).
      float16: store the weights in float16, half the file; on a CPU the
        interpreter computes in float32 from them.

    Returns:
      The file's size in bytes.

    Raises:
      UsageError: an export without the signature (written by an older effpipe).
    """
    if TFLITE_SIGNATURE not in _signature_names(export_dir):
        raise UsageError(
            f"{export_dir} has no {TFLITE_SIGNATURE} signature (an export from an older "
            "effpipe): train the run again to export it"
        )
    converter = tf.lite.TFLiteConverter.from_saved_model(
        export_dir, signature_keys=[TFLITE_SIGNATURE]
    )
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
    run_dir.write_atomically(
        path, lambda temporary: pathlib.Path(temporary).write_bytes(flatbuffer)
    )
    return len(flatbuffer)


def _signature_names(export_dir: str) -> set[str]:
    """The signature names in an export's saved_model.pb, read without loading it."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(pathlib.Path(export_dir, "saved_model.pb").read_bytes())
    return {name for graph in saved_model.meta_graphs for name in graph.signature_def}
