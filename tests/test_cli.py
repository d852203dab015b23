"""The command line shows itself: --helpshort by section, --print_config resolved."""

import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
from binaries import REPO_ROOT, run_train

from effpipe import cli_flags, cli_usage
from effpipe import config as config_lib
from effpipe import train as train_binary  # noqa: F401 (defines --workdir)
from effpipe.training import resolved_config, runtime


def test_helpshort_lists_the_programs_flags_then_the_shared_ones_by_section():
    result = subprocess.run(
        [sys.executable, "-m", "effpipe.train", "--helpshort"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    headings = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    titles = list(config_lib.SECTION_TITLES.values())
    assert headings[-len(titles) - 1 :] == ["effpipe.train", *titles]
    # Each flag sits under its own section, in the order cli_flags defines them.
    starts = [line.split(":")[0].strip() for line in lines if line.startswith("  --")]
    assert starts[:4] == ["--workdir", "--[no]overwrite", "--[no]print_config", "--[no]require_gpu"]
    data = lines.index(f"{config_lib.SECTION_TITLES['data']}:")
    model = lines.index(f"{config_lib.SECTION_TITLES['model']}:")
    assert lines[data + 1].startswith("  --dataset: ")
    assert lines[model + 1].startswith("  --variant: ")
    assert len(starts) == len(config_lib.FIELD_SLICES) + 4


def test_every_shared_flag_is_a_field_of_a_section():
    shared = [flag.name for flag in flags.FLAGS.get_flags_for_module(cli_flags)]
    assert sorted(shared) == sorted(config_lib.FIELD_SLICES)
    text = cli_usage.sectioned_help("effpipe.cli_flags", cli_flags.__name__)
    assert "effpipe.cli_flags:" not in text  # No shared flag is left without a section.


def test_print_config_prints_what_the_run_resolves_and_trains_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = run_train(
        "--flagfile=flags/smoke.flags", f"--workdir={workdir}", "--print_config", timeout_sec=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    for expected in (
        "  -> image size 64 px (--image_size)",
        "  -> source size 32 px, decoded on the host (0: 32 px",
        "  -> precision float32 (--mixed_precision not set)",
        "  -> XLA off (--xla=auto on CPU",
        "  -> phase 1: 1 train step per call (auto: 1 for the whole model on CPU)",
        "1 replica(s) over 1 worker(s), 32 images per replica per step",
        f"  -> cache auto: a split whose decoded images fit in 256 MB (up to 87381 images at "
        f"32 px) in memory, a larger one on disk in {workdir}/cache/images",
    ):
        assert expected in text, expected
    assert "  batch_size               32\n" in text
    assert not workdir.exists()


def test_print_config_of_a_b5_recipe_on_a_gpu_resolves_its_native_size_and_precision(
    monkeypatch,
):
    monkeypatch.chdir(REPO_ROOT)
    with flagsaver.flagsaver():
        flags.FLAGS(["effpipe.train", "--flagfile=flags/b5_rtx3070.flags", "--workdir=runs/b5"])
        config = cli_flags.config_from_flags()
    gpu = runtime.Devices("gpu", "NVIDIA GeForce RTX 3070", (8, 6))
    text = resolved_config.describe(config, "runs/b5", devices=gpu)
    assert "  -> image size 456 px (0: b5's native size)\n" in text
    assert "  -> source size 32 px" in text  # CIFAR-100's own size, resized on the device.
    assert "  -> precision mixed_float16 on GPU (auto), with dynamic loss scaling\n" in text
    assert "  -> XLA on (--xla=auto on GPU)\n" in text
    assert "  -> phase 2: up to 8 train steps per call (auto for the whole model on GPU" in text
    assert "hint:" not in text
    # The same recipe without mixed precision says how to turn it on.
    float32 = resolved_config.describe(config.replace(mixed_precision=False), "x", devices=gpu)
    assert f"  -> {runtime.MIXED_PRECISION_HINT}\n" in float32
