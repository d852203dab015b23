"""Converts a finished run's exported model to TFLite, for phones and microcontrollers.

    python -m effpipe.export_tflite --model=runs/demo
    python -m effpipe.export_tflite --model=runs/demo --float16 --output=demo_fp16.tflite

Writes WORKDIR/export.tflite (or --output): the export's `serve_source_images`
signature, which takes uint8 RGB images [N, S, S, 3] at the run's source size S
(e.g. 32 x 32; resize them first) and returns the same outputs as the SavedModel:
classes (top-k names), class_ids, probabilities and all_probabilities, in float32.

    interpreter = tf.lite.Interpreter("runs/demo/export.tflite")
    outputs = interpreter.get_signature_runner("serve_source_images")(images=batch)

--float16 stores the weights in float16: half the file (about 8 MB for B0 instead
of 16); its probabilities differ from float32's by about 1e-3 (at most 2e-2
measured on randomly initialised B0s). --model is a run directory (its export/ is
used) or an export folder itself. Bad input: one line on stderr, exit status 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from effpipe import cli_flags, run_dir
from effpipe.errors import UsageError

PROGRAM = "effpipe.export_tflite"

MODEL = flags.DEFINE_string(
    "model", None, "A run directory (with export/) or an export folder.", required=True
)
OUTPUT = flags.DEFINE_string(
    "output", None, "The .tflite file to write (default: export.tflite beside export/)."
)
FLOAT16 = flags.DEFINE_bool(
    "float16", False, "Store the weights in float16: half the file, float32 compute."
)


def main(argv):
    cli_flags.refuse_arguments(PROGRAM, argv)
    try:
        export_dir = run_dir.find_export(MODEL.value)
        # Imported here so that a bad flag fails before TensorFlow loads.
        from effpipe.outputs import export

        output = OUTPUT.value or os.path.join(os.path.dirname(export_dir), export.TFLITE_FILE)
        size_bytes = export.write_tflite(export_dir, output, float16=FLOAT16.value)
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    print(f"wrote {output} ({size_bytes / 2**20:.1f} MiB)", file=sys.stdout)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
