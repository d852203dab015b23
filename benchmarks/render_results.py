"""README's results table, rendered from the records under results/.

    python -m benchmarks.render_results            # rewrites README.md's table(s)
    python -m benchmarks.render_results --check    # exit 1 with a diff when it differs
    python -m benchmarks.render_results --readme=R --results_dir=D   # other files

Every block between `<!-- results:begin -->` and `<!-- results:end -->` in --readme
becomes a table with one row per record (results/*.json, see benchmarks.records):
what was measured, its headline figures, the machine, the date and a link to the
record, which holds the command, commit and every figure. A begin marker may name
the records it shows by their names' patterns, in order, as
`<!-- results:begin gpu_check-* demo-* -->`; without patterns it shows all, by name.
tests/test_results.py fails when README's tables differ from what the records render.
"""

import difflib
import fnmatch
import glob
import json
import os
import re
import sys

from absl import app, flags

from benchmarks import records

_CHECK = flags.DEFINE_bool("check", False, "Change nothing; exit 1 with a diff if README differs.")
_README = flags.DEFINE_string(
    "readme", os.path.join(records.REPO_ROOT, "README.md"), "The Markdown file to render into."
)

BEGIN = re.compile(r"<!-- results:begin(?P<patterns>[^>]*?)-->")
END = "<!-- results:end -->"
HEADER = ["what", "figure", "machine", "date", "record"]


def load_records(results_dir: str) -> list[dict]:
    """Every results_dir/*.json, by file name; each with "path", its file."""
    loaded = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as file:
            record = json.load(file)
        record["path"] = path
        loaded.append(record)
    return loaded


def select(loaded: list[dict], patterns: list[str]) -> list[dict]:
    """The records whose names match `patterns`, in the patterns' order (all when none)."""
    if not patterns:
        return loaded
    chosen = []
    for pattern in patterns:
        chosen += [r for r in loaded if fnmatch.fnmatch(r["name"], pattern) and r not in chosen]
    return chosen


def machine_cell(machine: dict | None) -> str:
    """The GPU's name; else "N-core CPU-model"; else the record's own words."""
    machine = machine or {}
    if machine.get("gpu"):
        return machine["gpu"]
    cpu, cores = machine.get("cpu"), machine.get("cores")
    if cpu and cores:
        return f"{cores}-core {cpu}"
    if cores:
        return f"{cores} CPU cores"
    return cpu or machine.get("description") or "-"


def render_table(selected: list[dict], link_from: str) -> str:
    """A Markdown table of `selected`; record links relative to the folder `link_from`."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for record in selected:
        headline = record.get("headline")
        figure = records.fill(headline, record["figures"]) if headline else ""
        link = os.path.relpath(record["path"], link_from).replace(os.sep, "/")
        cells = [
            record.get("what") or record["name"],
            figure,
            machine_cell(record.get("machine")),
            (record.get("date") or "-")[:10],
            f"[{record['name']}]({link})",
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def rewrite(text: str, loaded: list[dict], link_from: str) -> str:
    """`text` with every marker block's table rendered from `loaded`.

    Raises:
      ValueError: no begin marker, or one without an end marker after it.
    """
    pieces, position = [], 0
    for begin in BEGIN.finditer(text):
        if begin.start() < position:
            raise ValueError(f"a results:begin marker inside another block: {begin[0]}")
        end = text.find(END, begin.end())
        if end < 0:
            raise ValueError(f"{begin[0]} has no {END} after it")
        table = render_table(select(loaded, begin["patterns"].split()), link_from)
        pieces += [text[position : begin.end()], "\n", table, "\n"]
        position = end
    if not pieces:
        raise ValueError("no <!-- results:begin --> marker")
    return "".join(pieces) + text[position:]


def main(argv):
    del argv
    readme = os.path.abspath(_README.value)
    with open(readme) as file:
        text = file.read()
    loaded = load_records(records.RESULTS_DIR.value or records.RESULTS)
    try:
        rendered = rewrite(text, loaded, os.path.dirname(readme))
    except (ValueError, KeyError) as error:
        sys.exit(f"render_results: error: {readme}: {error}")
    if rendered == text:
        print(f"render_results: {readme} is up to date with {len(loaded)} records")
        return
    if _CHECK.value:
        sys.stdout.writelines(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                rendered.splitlines(keepends=True),
                readme,
                f"{readme} as the records render it",
            )
        )
        print(
            f"render_results: {readme}'s results table differs from the records: "
            "run python -m benchmarks.render_results",
            file=sys.stderr,
        )
        sys.exit(1)
    with open(readme, "w") as file:
        file.write(rendered)
    print(f"render_results: rewrote {readme}'s results table from {len(loaded)} records")


if __name__ == "__main__":
    app.run(main)
