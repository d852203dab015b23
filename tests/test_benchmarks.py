"""Each benchmark runs end to end in its seconds-long smoke mode, so it cannot rot (the
step and augmentation benchmarks inside the GPU check's smoke run: test_gpu_check.py;
here the keras_recipe peer in phase 2 with mixed precision)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from effpipe.errors import UsageError


def _env(repo_root):
    return {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_benchmark(repo_root, module, *args):
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(repo_root),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_input_throughput_smoke(repo_root):
    lines, report = _run_benchmark(repo_root, "benchmarks.input_throughput", "--smoke")
    assert any(line.startswith("target: effpipe >=") for line in lines)
    assert report["benchmark"] == "input_throughput"
    for key in ("effpipe_images_per_sec", "notebook_images_per_sec", "speedup"):
        assert report[key] > 0, key
    assert report["speedup"] == report["effpipe_images_per_sec"] / report["notebook_images_per_sec"]
    # The three chains of effpipe's and the notebook pipeline were timed.
    assert len(report["stages_images_per_sec"]) == 4
    assert all(rate > 0 for rate in report["stages_images_per_sec"].values())


@pytest.mark.parametrize(
    "module, flag",
    [
        ("benchmarks.step_throughput", "--variant=b9"),
        ("benchmarks.step_throughput", "--repeats=0"),
        ("benchmarks.input_throughput", "--num_batches=0"),
        ("benchmarks.augment_throughput", "--sizes=224,big"),
    ],
)
def test_bad_flag_of_a_benchmark_is_one_line_and_exit_2(repo_root, module, flag):
    result = subprocess.run(
        [sys.executable, "-m", module, flag],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(repo_root),
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"{module}: error:"), result.stderr[-2000:]
    assert flag.split("=")[0] in last_line
    assert "Traceback" not in result.stderr


def test_seed_baseline_still_names_the_notebook_baseline(repo_root):
    # --seed_baseline is --notebook_baseline's earlier name: old command lines still run.
    check = (
        "from absl import flags; from benchmarks import step_throughput as s; "
        "flags.FLAGS(['s', '--noseed_baseline']); assert s._NOTEBOOK_BASELINE.value is False; "
        "flags.FLAGS.unparse_flags(); flags.FLAGS(['s', '--seed_baseline']); "
        "assert s._NOTEBOOK_BASELINE.value is True"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(repo_root),
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_notebook_configurations_answer_to_their_earlier_seed_names():
    from benchmarks import step_configurations

    def group():
        names = ("notebook/numpy", "effpipe/noaug/pipeline")
        return step_configurations.Group(
            lambda: None, [step_configurations.Configuration(n, {}) for n in names]
        )

    (selected,) = step_configurations.select_configurations([group()], ["seed/numpy"])
    assert [c.name for c in selected.configurations] == ["notebook/numpy"]
    with pytest.raises(UsageError, match="nonsense/x not in this run"):
        step_configurations.select_configurations([group()], ["nonsense/x"])


def test_input_throughput_on_a_photo_folder_smoke(repo_root, tmp_path):
    from benchmarks import photo_folder

    folder = photo_folder.make_photo_folder(
        str(tmp_path / "photos"), num_photos=24, num_classes=2, width=80, height=60
    )
    lines, report = _run_benchmark(
        repo_root,
        "benchmarks.input_throughput",
        "--smoke",
        f"--dataset=folder:{folder}",
        "--image_size=32",
        "--batch_size=4",
    )
    assert any(line.startswith("target: first_pass >=") for line in lines)
    assert report["train_images"] == 24 and report["image_size"] == 32
    for key in (
        "first_pass_images_per_sec", "cached_images_per_sec", "keras_images_per_sec",
        "decode_ceiling_images_per_sec", "notebook_images_per_sec", "peak_rss_mb",
    ):  # fmt: skip
        assert report[key] > 0, key
    assert (
        report["speedup_cached"] == report["cached_images_per_sec"] / report["keras_images_per_sec"]
    )


def test_step_benchmark_sets_effpipe_beside_the_keras_recipe_peer_smoke(repo_root):
    peer = ("effpipe/aug/pipeline", "keras_recipe")
    lines, report = _run_benchmark(
        repo_root, "benchmarks.step_throughput", "--smoke", "--phase=2", "--mixed_precision",
        f"--configurations={','.join(peer)}",
    )  # fmt: skip
    assert report["phase"] == 2 and report["precision"] == "mixed_bfloat16"
    configurations = report["configurations"]
    assert set(configurations) == set(peer)
    effpipe_ms, peer_ms = (configurations[name]["ms_per_step"] for name in peer)
    speedup = configurations["effpipe/aug/pipeline"]["speedup_vs_keras_recipe"]
    assert speedup == peer_ms / effpipe_ms > 0
    assert report["targets"]["aug_speedup_vs_keras_recipe"]["value"] == speedup
    header = next(line for line in lines if line.lstrip().startswith("configuration"))
    assert header.rstrip().endswith("x keras_recipe")
    assert any(line.lstrip().startswith("keras_recipe ") for line in lines)


def test_the_report_divides_the_peers_step_by_effpipes_and_checks_the_gpu_target():
    from benchmarks import step_report

    def configuration(name, ms_per_step):
        record = {"ms_per_step": ms_per_step, "seconds": ms_per_step / 100.0, "steps": 10}
        record["images_per_sec"] = 32_000.0 / ms_per_step
        # The first record is the warm-up repeat: never counted.
        return types.SimpleNamespace(
            name=name, records=[dict(record, ms_per_step=1e6), record], peak_memory_mb=None
        )

    report = step_report.summarize(
        [configuration("effpipe/aug/pipeline", 20.0), configuration("keras_recipe", 50.0)]
    )
    assert report["effpipe/aug/pipeline"]["speedup_vs_keras_recipe"] == 2.5
    assert report["keras_recipe"]["speedup_vs_keras_recipe"] is None
    on_gpu = step_report.targets(report, types.SimpleNamespace(accelerator="gpu"))
    assert on_gpu["aug_speedup_vs_keras_recipe"] == {"value": 2.5, "limit": 1.5, "met": True}


def test_keras_recipe_trains_effpipes_network_from_its_base_on():
    import keras
    import tensorflow as tf

    from benchmarks import keras_recipe
    from effpipe.model import efficientnet, freezing

    network = efficientnet.make_model(
        variant="b0", image_size=48, source_size=(32, 32), num_classes=3, weights="imagenet",
        random_weights=True,
    )  # fmt: skip
    freezing.unfreeze_top_blocks(network, 2)
    model = keras_recipe.make_model(network)
    assert model.input_shape == (None, 48, 48, 3)
    # The same layer objects after the input, so the same trainable state in each phase.
    assert model.layers[1:] == network.layers[2:]
    assert [id(v) for v in model.trainable_variables] == [
        id(v) for v in network.trainable_variables
    ]
    # Fed the resize effpipe's model computes, it computes what effpipe's model does.
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    resized = tf.image.resize(tf.cast(images, tf.float32), (48, 48))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(resized)),
        keras.ops.convert_to_numpy(network(images)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_keras_recipe_dataset_augments_on_the_host_in_the_policys_dtype():
    import tensorflow as tf

    from benchmarks import harness, keras_recipe
    from effpipe.config import AugmentationConfig

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    with harness.precision_policy("mixed_bfloat16"):
        dataset = keras_recipe.make_dataset(
            images, labels, batch_size=4, image_size=24, augmentation=AugmentationConfig(),
            seed=0,
        )  # fmt: skip
        batch, batch_labels = next(iter(dataset))
    assert batch.shape == (4, 24, 24, 3) and batch.dtype == tf.bfloat16
    assert batch_labels.shape == (4,) and batch_labels.dtype == tf.int32
    layers = keras_recipe.make_augmentation_layers(AugmentationConfig(), 24, seed=0)
    assert [type(layer).__name__ for layer in layers] == [
        "RandomRotation", "RandomTranslation", "RandomZoom", "RandomFlip", "Resizing",
    ]  # fmt: skip
    # effpipe's 40 degrees as Keras' fraction of a full turn.
    assert layers[0].factor == (-40.0 / 360.0, 40.0 / 360.0)
