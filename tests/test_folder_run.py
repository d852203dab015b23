"""A training run on a folder of image files, end to end through the binary.

In its own file so that pytest-xdist runs it beside test_train.py's long runs.
"""

import json

import image_files
from binaries import run_train


def test_a_folder_run_stores_at_the_model_resolution_and_reports_skipped_files(tmp_path):
    root = tmp_path / "photos"
    names = [f"{index}.jpg" for index in range(10)] + [f"{index}.png" for index in range(10, 16)]
    image_files.write_class_folder_tree(root, {"train": {"ant": names, "bee": names}})
    image_files.write_truncated_jpeg(root / "train" / "bee" / "cut.jpg")
    workdir = tmp_path / "run"
    result = run_train(
        "--flagfile=flags/smoke.flags",
        f"--dataset=folder:{root}",
        "--image_size=40",
        "--on_bad_image=skip",
        "--batch_size=8",
        "--cache=disk",
        # Phase 1 alone and no export: the data path is what this test is about.
        "--phase2_epochs=0",
        "--noexport",
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1
    assert metrics["skipped_image_paths"] == [str(root / "train" / "bee" / "cut.jpg")]
    assert metrics["evaluated_on"] == "validation" and metrics["num_classes"] == 2
    # Stored at the model resolution (40 px, not CIFAR's 32): the cache's folder says so,
    # and the run reuses it when started again.
    [cache_folder] = (workdir / "cache" / "images").glob("folder-train-40px-*")
    assert (cache_folder / "manifest.json").is_file()
    assert "skipped 1 of 33 folder-train images" in result.stderr
