"""What a run leaves to look at and use: the export, predict, the plots."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from effpipe.data import decode
from effpipe.model import batch_norm, efficientnet
from effpipe.outputs import evaluation, export, plots

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_NAMES = ("apple", "bear", "cloud", "dolphin")
SOURCE_SIZE = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model with peaked outputs, exported; and image files of other sizes."""
    folder = tmp_path_factory.mktemp("export")
    model = efficientnet.make_model(
        variant="b0", image_size=32, source_size=(SOURCE_SIZE, SOURCE_SIZE),
        num_classes=len(CLASS_NAMES), weights="none",
    )  # fmt: skip
    # Statistics calibrated on images like the test's, and random head weights: the
    # probabilities differ clearly between images, so equal outputs mean the same
    # computation.
    rng = np.random.default_rng(0)
    images = _blocky_images(rng, 32, 40, 56)
    calibration = decode.resize_to_size(images, SOURCE_SIZE, "resize").numpy()
    batch_norm.calibrate_batch_norm(model, calibration, batch_size=16)
    pooled = keras.Model(model.input, model.get_layer("head_pool").output)(calibration).numpy()
    model.get_layer("head_bn").moving_mean.assign(pooled.mean(axis=0))
    model.get_layer("head_bn").moving_variance.assign(pooled.var(axis=0) + 1e-3)
    dense = model.get_layer("predictions")
    dense.kernel.assign(rng.normal(0, 0.05, dense.kernel.shape).astype(np.float32))
    export.export_model(model, CLASS_NAMES, str(folder / "run" / "export"), top_k=3)
    images = images[:3]
    files = []
    for index, image in enumerate(images):
        png, jpeg = folder / f"image{index}.png", folder / f"image{index}.jpg"
        png.write_bytes(tf.io.encode_png(image).numpy())
        jpeg.write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
        files += [png, jpeg]
    return model, folder / "run", files


def _blocky_images(rng, count, height, width):
    """Random colour blocks of 8 x 8 pixels: images with structure at any size."""
    blocks = rng.integers(0, 256, (count, height // 8, width // 8, 3), dtype=np.uint8)
    return blocks.repeat(8, axis=1).repeat(8, axis=2)


def _in_process_probabilities(model, paths):
    """The model on the files decoded and resized as the folder loader does, one batch."""
    images = [
        decode.decode_to_size(tf.io.read_file(str(path)), SOURCE_SIZE, "resize") for path in paths
    ]
    return _traced(model)(tf.stack(images)).numpy()


def _traced(model):
    """The model as a traced function, as the export runs it: eager kernels round
    differently from a graph's fused ones, by up to 1.7e-4 in probabilities measured
    through a random base, where the two graphs agree to float32 rounding."""
    return tf.function(lambda images: model(images, training=False))


PLAIN_TENSORFLOW = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    encoded = [open(path, "rb").read() for path in sys.argv[2:]]
    outputs = loaded.signatures["serving_default"](images=tf.constant(encoded))
    assert not any(name.startswith("effpipe") for name in sys.modules), "imports effpipe"
    print(json.dumps({
        "all": outputs["all_probabilities"].numpy().tolist(),
        "classes": [[c.decode() for c in row] for row in outputs["classes"].numpy()],
        "top": outputs["probabilities"].numpy().tolist(),
    }))
    """
)


def test_the_export_serves_png_and_jpeg_bytes_in_plain_tensorflow(exported):
    model, workdir, files = exported
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TENSORFLOW, str(workdir / "export"), *map(str, files)],
        capture_output=True, text=True, timeout=300, cwd="/",
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    expected = _in_process_probabilities(model, files)
    # The same graph on the same bytes in one batch: equal up to float32 rounding.
    np.testing.assert_allclose(served["all"], expected, atol=1e-5)
    assert np.ptp(expected.argmax(axis=1)) > 0, "the images should not all get one class"
    for row, probabilities, top in zip(served["classes"], expected, served["top"]):
        order = np.argsort(-probabilities)[:3]
        assert row == [CLASS_NAMES[i] for i in order]
        np.testing.assert_allclose(top, probabilities[order], atol=1e-5)


def test_the_uint8_signature_takes_images_of_any_size(exported):
    model, workdir, _ = exported
    loaded = tf.saved_model.load(str(workdir / "export"))
    rng = np.random.default_rng(1)
    at_source = _blocky_images(rng, 2, SOURCE_SIZE, SOURCE_SIZE)
    served = loaded.signatures["serve_images"](images=tf.constant(at_source))
    # Images already at the source size reach the model unchanged (the resize is
    # exactly the identity there); the saved graph and the traced model then agree
    # up to float32 rounding, as in the test above.
    assert np.array_equal(decode.resize_to_size(at_source, SOURCE_SIZE, "resize"), at_source)
    np.testing.assert_allclose(
        served["all_probabilities"].numpy(), _traced(model)(at_source).numpy(), atol=1e-5
    )
    larger = rng.integers(0, 256, (2, 48, 30, 3), dtype=np.uint8)
    assert loaded.signatures["serve_images"](images=tf.constant(larger))["classes"].shape == (2, 3)
    names = loaded.signatures["class_names"]()["class_names"].numpy()
    assert [n.decode() for n in names] == list(CLASS_NAMES)


def test_predict_answers_every_readable_image_and_names_the_others(exported, tmp_path):
    _, workdir, files = exported
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "effpipe.predict", f"--model={workdir}", "--top_k=2",
         str(files[0]), str(bad), str(missing), str(files[1])],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    answers = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in answers] == [str(files[0]), str(files[1])]
    for line in answers:
        pairs = line.split(": ", 1)[1].split(", ")
        assert len(pairs) == 2 and all(p.split()[0] in CLASS_NAMES for p in pairs)
    errors = [line for line in result.stderr.splitlines() if line.startswith("effpipe.predict:")]
    assert errors == [
        f"effpipe.predict: {bad}: not an image TensorFlow can decode (JPEG, PNG, GIF, BMP)",
        f"effpipe.predict: {missing}: cannot read (No such file or directory)",
    ]


def test_summarize_counts_top1_top5_and_per_class():
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4], [0.2, 0.5, 0.3]], np.float32
    )
    labels = np.array([0, 1, 1, 1])
    summary = evaluation.summarize(probabilities, labels, ("a", "b", "c"), top_k=2)
    assert summary["top1"] == 0.5 and summary["top5"] == 0.75
    assert summary["per_class_accuracy"] == {"a": 1.0, "b": 1 / 3}
    assert [w["class"] for w in summary["worst_classes"]] == ["b", "a"]


def check_png(path, min_size=(400, 200)):
    """The PNG decodes, is at least `min_size` (width, height) and is not blank."""
    image = tf.io.decode_png(tf.io.read_file(str(path))).numpy()
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1], image.shape
    assert image.std() > 5, f"{path} is blank"
    return image


def test_the_plots_draw_something(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    probabilities = rng.dirichlet(np.ones(4), 6).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1])
    plots.plot_predictions(images, labels, probabilities, CLASS_NAMES, str(tmp_path / "p.png"))
    plots.plot_augmentations(images[0], images[:4] * 1.0, str(tmp_path / "a.png"))
    plots.plot_per_class({"a": 0.1, "b": 0.9}, str(tmp_path / "c.png"))
    for name, size in (("p.png", (1000, 400)), ("a.png", (600, 200)), ("c.png", (500, 200))):
        check_png(tmp_path / name, size)
