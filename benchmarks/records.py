"""Results as data: each benchmark run can leave a JSON record under results/.

    python -m benchmarks.input_throughput --results_dir=results
    python -m benchmarks.render_results          # README's results table from results/

A record is one file, results/<name>.json, whose name says the configuration
(benchmark, device, model, size, batch, precision...), holding:

  name      the file's name without .json
  what      one line: what was measured
  figures   the benchmark's final JSON line (or a part's figures), numbers as printed
  headline  the figures README's table shows: a template over `figures`, e.g.
            "{speedup:.0f}x"; a nested figure is named by its path ("sizes/224/speedup")
  command   the command line that measured it
  machine   {cpu: model, cores, gpu: name(s) from nvidia-smi or null}; a transcribed
            record adds "description", the machine in its source's words
  software  Python, TensorFlow and Keras versions
  date      when (ISO 8601)
  commit    `git rev-parse --short HEAD`, "-dirty" when tracked files outside
            results/ differ from it
  notes     anything else a reader needs (null if nothing)

A benchmark writes its record only when asked (--results_dir=DIR): tests and smoke
runs never touch results/. Records written by hand (figures transcribed from an
earlier README) say so in a "source" field.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO_ROOT, "results")

RESULTS_DIR = flags.DEFINE_string(
    "results_dir",
    "",
    "A folder of result records: a benchmark writes its run's record there when set "
    "(e.g. --results_dir=results; empty: no record), render_results reads it.",
)

# step_throughput's like-with-like pairs in a record's headline: (whom effpipe is set
# against, label, effpipe's configuration, the other's, the ratio's key).
_STEP_PAIRS = [
    ("the notebook", "compute", "effpipe/noaug/synthetic", "notebook/synthetic", "speedup_vs_notebook"),
    ("the notebook", "fed", "effpipe/noaug/pipeline", "notebook/numpy", "speedup_vs_notebook"),
    ("the notebook", "augmenting", "effpipe/aug/pipeline", "notebook/generator", "speedup_vs_notebook"),
    ("keras_recipe", "augmenting", "effpipe/aug/pipeline", "keras_recipe", "speedup_vs_keras_recipe"),
]  # fmt: skip


# --- Writing. ---


def write_record(
    name: str,
    figures: dict,
    *,
    command: str | None = None,
    notes: str | None = None,
    what: str | None = None,
    headline: str | None = None,
    results_dir: str | None = None,
) -> str:
    """Writes results_dir/<name>.json (default: the repo's results/); returns its path.

    Args:
      name: the configuration, as a file name ([A-Za-z0-9._+-]; other runs of
        characters become "_").
      figures: what was measured (JSON-serializable; nested dicts allowed).
      command: the command line; default: this process's own (`python -m MODULE
        FLAGS`).
      notes: anything else a reader needs.
      what: one line saying what was measured.
      headline: a template over `figures` (see `fill`); checked here, so a record
        always renders.
    """
    name = slug(name)
    if headline is not None:
        fill(headline, figures)
    record = {
        "name": name,
        "what": what,
        "figures": figures,
        "headline": headline,
        "command": command or own_command(),
        "machine": machine(),
        "software": software(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "notes": notes,
    }
    folder = results_dir or RESULTS
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".json")
    with open(path + ".tmp", "w") as file:
        file.write(json.dumps(record, indent=1) + "\n")
    os.replace(path + ".tmp", path)
    return path


def record_benchmark(payload: dict, tags: list[str] = ()) -> str | None:
    """Writes the record of a benchmark's final JSON line when --results_dir is set.

    The name is the benchmark's and its configuration's (from `payload`), then `tags`
    (what the payload does not say, such as a subset of configurations). Prints
    where it wrote; returns the path, or None when not asked.
    """
    if not RESULTS_DIR.value:
        return None
    name, what, headline = DESCRIBE[payload["benchmark"]](payload)
    path = write_record(
        "-".join([name, *tags]),
        payload,
        what=what,
        headline=headline,
        results_dir=RESULTS_DIR.value,
    )
    print(f"record: {path}", file=sys.stderr)
    return path


# --- Provenance. ---


def own_command() -> str:
    """This process's command line, as `python -m MODULE FLAGS` when run with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec and spec.name else [sys.argv[0]]
    return shlex.join(["python", *program, *sys.argv[1:]])


def machine() -> dict:
    """{cpu: model name, cores: logical CPUs, gpu: nvidia-smi's names, or None}."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or None
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        names = [line.strip() for line in listed.stdout.splitlines() if line.strip()]
        gpu = ", ".join(names) if listed.returncode == 0 and names else None
    except (OSError, subprocess.TimeoutExpired):
        gpu = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def software() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("tensorflow", "keras"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def commit() -> str | None:
    """The short hash of HEAD, with "-dirty" when the tree differs from it (results/
    aside: records are written after the fact); None outside a git checkout."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=30
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


# --- Names and templates. ---


def slug(text: str) -> str:
    """`text` as a file name: runs of characters other than [A-Za-z0-9._+-] become "_"."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def device_tag(device: str) -> str:
    """A device's name as a tag: "NVIDIA H200" -> "h200"; "CPU" -> "cpu"."""
    return slug(device.lower().removeprefix("nvidia").strip())


def dataset_tag(dataset: str) -> str:
    """A --dataset as a tag: "folder:/tmp/photos2000" -> "folder_photos2000"."""
    kind, _, where = dataset.partition(":")
    return slug(f"{kind}_{os.path.basename(where.rstrip('/'))}" if where else kind)


def flatten(figures: dict, prefix: str = "") -> dict:
    """Nested figures as one level, keys joined by "/"."""
    flat = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def fill(template: str, figures: dict) -> str:
    """`template` with each {path} or {path:spec} replaced by that figure, formatted
    by `spec` (Python's format mini-language); a missing figure raises KeyError, a
    null one reads "-"."""
    flat = flatten(figures)

    def value(match):
        key, spec = match[1], match[2] or ""
        if key not in flat:
            raise KeyError(f"the headline names {key!r}, not a figure of the record")
        return "-" if flat[key] is None else format(flat[key], spec)

    return _FIELD.sub(value, template)


# --- What each benchmark's record says: (name, what, headline) from its JSON line. ---


def _input_throughput(payload: dict) -> tuple[str, str, str]:
    dataset, batch = payload["dataset"], payload["batch_size"]
    if "first_pass_images_per_sec" in payload:
        size = payload["image_size"]
        return (
            f"input_throughput-{dataset_tag(dataset)}-{size}px-b{batch}",
            f"input from files, {dataset} ({payload['train_images']:,} images) at {size} px, "
            f"batch {batch}",
            "first pass {first_pass_images_per_sec:,.0f} images/s ({speedup_first_pass:.2f}x "
            "Keras), cached {cached_images_per_sec:,.0f} ({speedup_cached:.1f}x)",
        )
    count = payload["train_images"]
    return (
        f"input_throughput-{dataset_tag(dataset)}-{count}img-b{batch}",
        f"host input pipeline, {dataset} ({count:,} images), batch {batch}",
        "{effpipe_images_per_sec:,.0f} images/s against the notebook's "
        "{notebook_images_per_sec:,.0f} ({speedup:.0f}x)",
    )


def _step_throughput(payload: dict) -> tuple[str, str, str]:
    device, variant, size = device_tag(payload["device"]), payload["variant"], payload["image_size"]
    batch, phase, precision = payload["batch_size"], payload["phase"], payload["precision"]
    xla = "on" if payload["xla"] else "off"
    report = payload["configurations"]
    sections, paired = {}, set()
    for against, label, name, other, ratio in _STEP_PAIRS:
        if name in report and other in report:
            sections.setdefault(f"effpipe against {against}", []).append(
                f"{label} {{configurations/{name}/ms_per_step:,.4g}} against "
                f"{{configurations/{other}/ms_per_step:,.4g}} ({{configurations/{name}/{ratio}:.2f}}x)"
            )
            paired.update((name, other))
    parts = [f"{key}: {', '.join(pairs)}" for key, pairs in sections.items()]
    parts += [
        f"{name} {{configurations/{name}/ms_per_step:,.4g}}"
        for name in report
        if name not in paired
    ]
    if payload.get("phase1_feature_cache"):
        parts.append(
            "a phase-1 epoch on cached features {phase1_feature_cache/epoch_seconds_with_cache:.3g} "
            "s against {phase1_feature_cache/epoch_seconds_without_cache:.3g} s"
        )
    return (
        f"step_throughput-{device}-{variant}-{size}px-b{batch}-p{phase}-{precision}-xla_{xla}",
        f"{variant.upper()} train step, {size} px, batch {batch}, phase {phase}, {precision}, "
        f"XLA {xla}",
        "ms/step, " + "; ".join(parts),
    )


def _augment_throughput(payload: dict) -> tuple[str, str, str]:
    sizes = list(payload["sizes"])
    batch, source = payload["batch_size"], payload["source_size"]
    return (
        f"augment_throughput-{device_tag(payload['device'])}-{payload['dtype']}-b{batch}"
        f"-src{source}-{'+'.join(s + 'px' for s in sizes)}",
        f"fused augment + resize against Keras' layers, batch {batch}, {source} px to "
        f"{' / '.join(sizes)} px, {payload['dtype']}",
        "; ".join(
            f"{size} px: {{sizes/{size}/fused_images_per_sec:,.0f}} images/s against "
            f"{{sizes/{size}/keras_chain_images_per_sec:,.0f}} ({{sizes/{size}/speedup:.2f}}x)"
            for size in sizes
        ),
    )


HEADLINE_RUN = (
    "start to phase 1 {startup_seconds:.3g} s; first step {first_step_seconds/phase1:.3g} s / "
    "{first_step_seconds/phase2:.3g} s after phase 1 / 2 start; {images_per_sec/phase1:,.1f} / "
    "{images_per_sec/phase2:,.1f} images/s"
)


def _headline_run(payload: dict) -> tuple[str, str, str]:
    device, variant, size = device_tag(payload["device"]), payload["variant"], payload["image_size"]
    batch, precision = payload["batch_size"], payload["precision"]
    xla = "on" if payload["xla"] else "off"
    return (
        f"headline_run-{device}-{variant}-{size}px-b{batch}-{precision}-xla_{xla}",
        f"the headline command end to end, {variant.upper()} at {size} px, batch {batch}, "
        f"{precision}, XLA {xla}, {payload['steps_per_phase']} steps per phase",
        HEADLINE_RUN,
    )


DESCRIBE = {
    "input_throughput": _input_throughput,
    "step_throughput": _step_throughput,
    "augment_throughput": _augment_throughput,
    "headline_run": _headline_run,
}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
