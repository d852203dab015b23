"""Classifies image files with a finished run's exported model.

    python -m effpipe.predict --model=runs/demo photo.png other.jpg
    python -m effpipe.predict --model=runs/b5/export --top_k=3 images/*.jpg

Prints, per image, its top-k classes and probabilities:

    photo.png: square 0.912, diamond 0.051, plus 0.020, ring 0.009, triangle 0.004

An image that cannot be read or decoded gets one line on stderr and the others
still get answers; the exit status is then 1. --model is a run directory (its
export/ is used) or an export folder itself.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from effpipe import cli_flags, run_dir
from effpipe.errors import UsageError

PROGRAM = "effpipe.predict"

MODEL = flags.DEFINE_string(
    "model", None, "A run directory (with export/) or an export folder.", required=True
)
TOP_K = flags.DEFINE_integer("top_k", 5, "Classes printed per image.")


def main(argv):
    paths = argv[1:]
    try:
        if not paths:
            raise UsageError("no image given: python -m effpipe.predict --model=WORKDIR IMAGE...")
        if TOP_K.value < 1:
            raise UsageError(f"--top_k={TOP_K.value} must be at least 1: pass e.g. --top_k=5")
        export_dir = run_dir.find_export(MODEL.value)
        import numpy as np
        import tensorflow as tf

        from effpipe.outputs import export

        exported = export.load(export_dir)
        serve = exported.signatures["serving_default"]
        names = [n.decode() for n in exported.signatures["class_names"]()["class_names"].numpy()]
    except UsageError as error:
        cli_flags.exit_with_usage_error(PROGRAM, error)
    failed = 0
    for path in paths:
        try:
            with open(path, "rb") as file:
                encoded = file.read()
            outputs = serve(images=tf.constant([encoded]))
        except OSError as error:
            failed += 1
            print(f"{PROGRAM}: {path}: cannot read ({error.strerror})", file=sys.stderr)
            continue
        except tf.errors.InvalidArgumentError:
            failed += 1
            print(
                f"{PROGRAM}: {path}: not an image TensorFlow can decode (JPEG, PNG, GIF, BMP)",
                file=sys.stderr,
            )
            continue
        probabilities = outputs["all_probabilities"].numpy()[0]
        order = np.argsort(-probabilities, kind="stable")[: TOP_K.value]
        answer = ", ".join(f"{names[i]} {probabilities[i]:.3f}" for i in order)
        print(f"{path}: {answer}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.make_flags_parser(PROGRAM))
