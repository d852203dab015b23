"""Results as data: README's results table is what results/*.json render, records say
where they come from, and the docs stay inside their word budgets."""

import datetime
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from absl.testing import flagsaver

from benchmarks import gpu_check_report, records, render_results

README_WORDS = 1800
DEVELOPER_DOC_WORDS = 3000
ALL_MARKDOWN_WORDS = 5500
RECORD_KEYS = {"name", "what", "figures", "headline", "command", "machine", "date", "commit"}


def _env(repo_root):
    return {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _render(repo_root, *args):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.render_results", *args],
        cwd=repo_root, capture_output=True, text=True, timeout=120, env=_env(repo_root),
    )  # fmt: skip


# --- The real README and records. ---


def test_readmes_results_table_is_what_the_records_render(repo_root):
    readme = repo_root / "README.md"
    text = readme.read_text()
    loaded = render_results.load_records(str(repo_root / "results"))
    rendered = render_results.rewrite(text, loaded, str(repo_root))
    assert rendered == text, "README's results table is stale: python -m benchmarks.render_results"


def test_every_record_names_its_command_machine_and_file(repo_root):
    paths = sorted(glob.glob(str(repo_root / "results" / "*.json")))
    assert paths
    for path in paths:
        with open(path) as file:
            record = json.load(file)
        assert RECORD_KEYS <= set(record), path
        assert record["name"] + ".json" == os.path.basename(path)
        assert record["command"], path
        assert record["machine"], path
        if record["headline"]:
            records.fill(record["headline"], record["figures"])


# --- The renderer. ---


def _record(folder, name, figures, headline, **fields):
    path = records.write_record(name, figures, headline=headline, results_dir=str(folder), **fields)
    with open(path) as file:
        return json.load(file)


def test_rewrite_renders_each_marker_block_and_keeps_the_rest(tmp_path):
    results = tmp_path / "results"
    _record(results, "b-run", {"rate": 1234.5}, "{rate:,.0f} images/s", what="b | pipe")
    _record(results, "a-run", {"x": {"y": 0.25}}, "{x/y:.0%}", what="a")
    text = (
        "# Title\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nmiddle\n\n"
        "<!-- results:begin b-* -->\n<!-- results:end -->\ntail\n"
    )
    loaded = render_results.load_records(str(results))
    rendered = render_results.rewrite(text, loaded, str(tmp_path))
    blocks = re.findall(r"results:begin[^>]*-->\n(.*?)\n<!-- results:end", rendered, re.S)
    first, second = (block.splitlines() for block in blocks)
    assert first[0] == "| what | figure | machine | date | record |"
    # All records by name; a pattern picks; "|" in a cell is escaped.
    assert [line.split(" | ")[0] for line in first[2:]] == ["| a", "| b \\| pipe"]
    assert first[2].split(" | ")[1] == "25%"
    assert "[a-run](results/a-run.json)" in first[2]
    assert second[2:] == first[3:]
    assert second[2].split(" | ")[1] == "1,234 images/s"
    assert rendered.startswith("# Title\n") and "\n\nmiddle\n\n" in rendered
    assert rendered.endswith("<!-- results:end -->\ntail\n")
    # Rendering is idempotent.
    assert render_results.rewrite(rendered, loaded, str(tmp_path)) == rendered


def test_patterns_order_the_rows():
    loaded = [{"name": n} for n in ("demo", "gpu-a", "gpu-b", "cpu")]
    chosen = render_results.select(loaded, ["gpu-*", "demo", "gpu-a"])
    assert [r["name"] for r in chosen] == ["gpu-a", "gpu-b", "demo"]


def test_a_block_without_its_end_marker_is_an_error():
    with pytest.raises(ValueError, match="no <!-- results:end -->"):
        render_results.rewrite("<!-- results:begin -->\n", [], ".")
    with pytest.raises(ValueError, match="no <!-- results:begin"):
        render_results.rewrite("no markers\n", [], ".")


def test_machine_cell():
    cell = render_results.machine_cell
    assert cell({"cpu": "AMD EPYC", "cores": 2, "gpu": "NVIDIA H200"}) == "NVIDIA H200"
    assert cell({"cpu": "AMD EPYC", "cores": 2, "gpu": None}) == "2-core AMD EPYC"
    assert cell({"cpu": None, "cores": 2, "gpu": None}) == "2 CPU cores"
    assert cell({"cpu": None, "cores": None, "gpu": None, "description": "a box"}) == "a box"


def test_check_exits_1_with_a_diff_until_the_table_is_rendered(repo_root, tmp_path):
    results = tmp_path / "results"
    _record(results, "run", {"ms": 21.7}, "{ms:.1f} ms/step", what="step")
    readme = tmp_path / "README.md"
    readme.write_text("## Results\n\n<!-- results:begin -->\n<!-- results:end -->\n")
    flags = [f"--readme={readme}", f"--results_dir={results}"]
    stale = _render(repo_root, *flags, "--check")
    assert stale.returncode == 1
    assert "+| step | 21.7 ms/step |" in stale.stdout
    assert "differs from the records" in stale.stderr
    assert readme.read_text().count("\n") == 4  # --check changes nothing
    assert _render(repo_root, *flags).returncode == 0
    assert "| step | 21.7 ms/step |" in readme.read_text()
    assert _render(repo_root, *flags, "--check").returncode == 0


# --- Records. ---


def test_write_record_says_what_where_when_and_at_which_commit(tmp_path):
    record = _record(
        tmp_path, "step/b0 224", {"configurations": {"a/b": {"ms_per_step": 2.0}}},
        "{configurations/a/b/ms_per_step:.1f} ms", notes="n",
    )  # fmt: skip
    assert record["name"] == "step_b0_224"
    assert (tmp_path / "step_b0_224.json").is_file()
    assert record["command"].startswith("python ")
    assert record["machine"]["cores"] == os.cpu_count()
    assert set(record["machine"]) == {"cpu", "cores", "gpu"}
    assert re.fullmatch(r"[0-9a-f]{4,}(-dirty)?", record["commit"])
    assert datetime.datetime.fromisoformat(record["date"]).tzinfo is not None
    assert record["notes"] == "n" and record["software"]["tensorflow"]


def test_a_headline_naming_no_figure_writes_no_record(tmp_path):
    with pytest.raises(KeyError, match="'speed'"):
        records.write_record("x", {"rate": 1}, headline="{speed}", results_dir=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_fill_formats_nested_figures_and_nulls():
    figures = {"sizes": {"224": {"speedup": 3.248}}, "peak": None, "n": 1475}
    assert records.fill("{sizes/224/speedup:.1f}x, {n:,}, {peak:.0f} MB", figures) == (
        "3.2x, 1,475, - MB"
    )


def test_benchmarks_write_records_only_when_asked(tmp_path):
    payload = {
        "benchmark": "augment_throughput", "device": "NVIDIA H100 80GB HBM3",
        "dtype": "float32", "batch_size": 32, "source_size": 32,
        "sizes": {"224": {"fused_images_per_sec": 9.0, "keras_chain_images_per_sec": 3.0,
                          "speedup": 3.0}},
    }  # fmt: skip
    assert records.record_benchmark(payload) is None  # --results_dir unset
    with flagsaver.flagsaver(results_dir=str(tmp_path)):
        path = records.record_benchmark(payload)
    assert (
        os.path.basename(path) == "augment_throughput-h100_80gb_hbm3-float32-b32-src32-224px.json"
    )
    record = json.loads(open(path).read())
    assert record["figures"] == payload
    assert records.fill(record["headline"], payload) == "224 px: 9 images/s against 3 (3.00x)"


def test_step_records_pair_effpipe_with_the_notebook_and_the_peer():
    payload = {
        "benchmark": "step_throughput", "device": "CPU", "variant": "b0", "image_size": 224,
        "batch_size": 32, "phase": 1, "precision": "float32", "xla": False,
        "phase1_feature_cache": None,
        "configurations": {
            "effpipe/aug/pipeline": {"ms_per_step": 20.0, "speedup_vs_notebook": 2.0,
                                     "speedup_vs_keras_recipe": 2.5},
            "notebook/generator": {"ms_per_step": 40.0},
            "keras_recipe": {"ms_per_step": 50.0},
            "effpipe/noaug/synthetic": {"ms_per_step": 10.0},
        },
    }  # fmt: skip
    name, what, headline = records.DESCRIBE["step_throughput"](payload)
    assert name == "step_throughput-cpu-b0-224px-b32-p1-float32-xla_off"
    assert what == "B0 train step, 224 px, batch 32, phase 1, float32, XLA off"
    assert records.fill(headline, payload) == (
        "ms/step, effpipe against the notebook: augmenting 20 against 40 (2.00x); effpipe "
        "against keras_recipe: augmenting 20 against 50 (2.50x); effpipe/noaug/synthetic 10"
    )


def test_gpu_check_writes_a_record_per_part_that_succeeded(tmp_path):
    report = {
        "command": "python -m benchmarks.gpu_check",
        "tensorflow_gpus": [{"name": "NVIDIA H200"}],
        "parts": {
            "step_p2_mixed_xla_on": {"status": "ok", "command": "python -m x", "result": None,
                                     "figures": {"effpipe/noaug/synthetic/ms_per_step": 23.9}},
            "headline": {"status": "ok", "command": "python -m h", "result": None,
                         "figures": {"startup_seconds": 12.0,
                                     "first_step_seconds/phase1": 85.2,
                                     "first_step_seconds/phase2": 61.0,
                                     "images_per_sec/phase1": 1000.0,
                                     "images_per_sec/phase2": 900.0}},
            "augment": {"status": "timed_out"},
        },
        "summary": {"steps": [{"part": "step_p2_mixed_xla_on", "ms_per_step": 23.9,
                               "images_per_sec": 1338.0, "fed_ms_per_step": None,
                               "xla": True}]},
    }  # fmt: skip
    with flagsaver.flagsaver(results_dir=str(tmp_path)):
        paths = gpu_check_report.record_gpu_check(report)
    names = sorted(os.path.basename(path) for path in paths)
    assert names == ["gpu_check-h200-headline.json", "gpu_check-h200-step_p2_mixed_xla_on.json"]
    headline, step = (json.loads(open(path).read()) for path in sorted(paths))
    assert step["command"] == "python -m x"
    assert records.fill(step["headline"], step["figures"]) == "23.9 ms/step (1,338 images/s)"
    assert records.fill(headline["headline"], headline["figures"]) == (
        "start to phase 1 12 s; first step 85.2 s / 61 s after phase 1 / 2 start; "
        "1,000.0 / 900.0 images/s"
    )


def test_a_benchmark_run_with_results_dir_leaves_its_record_smoke(repo_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.input_throughput", "--smoke", f"--results_dir={tmp_path}"],
        cwd=repo_root, capture_output=True, text=True, timeout=600, env=_env(repo_root),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("input_throughput-shapes-*img-b8.json")
    record = json.loads(path.read_text())
    assert record["figures"] == json.loads(result.stdout.strip().splitlines()[-1])
    assert record["command"].startswith("python -m benchmarks.input_throughput --smoke")
    assert "images/s against the notebook's" in records.fill(record["headline"], record["figures"])


# --- Word budgets. ---


def _markdown_files(repo_root) -> list[str]:
    """Tracked Markdown and untracked Markdown git does not ignore (not .venv/, runs/)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return sorted({path for path in listed if (repo_root / path).is_file()})


def _words(repo_root, path) -> int:
    return len((repo_root / path).read_text().split())


def test_docs_stay_inside_their_word_budgets(repo_root):
    files = _markdown_files(repo_root)
    counts = {path: _words(repo_root, path) for path in files}
    developer = {p: n for p, n in counts.items() if p == "WORKSPACE.md" or p.startswith("docs/")}
    problems = []
    if counts.get("README.md", 0) > README_WORDS:
        problems.append(f"README.md {counts['README.md']} words > {README_WORDS}")
    if sum(developer.values()) > DEVELOPER_DOC_WORDS:
        problems.append(f"{developer} {sum(developer.values())} words > {DEVELOPER_DOC_WORDS}")
    if sum(counts.values()) > ALL_MARKDOWN_WORDS:
        problems.append(f"all Markdown {sum(counts.values())} words > {ALL_MARKDOWN_WORDS}")
    assert not problems, "; ".join(problems)
