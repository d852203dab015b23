"""Shared timing and reporting for the benchmarks.

Every benchmark times its candidates in the same process, interleaved repeat by
repeat (a shared, noisy machine then slows all of them alike), after warm-up calls
that also absorb tracing and XLA compilation, and reports the median of the
repeats. Results are a table for people and, last, one JSON line for tools.
"""

import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable


@dataclasses.dataclass
class Candidate:
    """One thing to time.

    Attributes:
      name: its row label.
      run: one step of work; returns a tensor whose fetch waits for the step, or
        None when the work is done on return (host-side Python).
      items_per_step: images (or examples) one call processes.
    """

    name: str
    run: Callable
    items_per_step: int


def time_interleaved(
    candidates: list[Candidate], *, warmup_steps: int, repeats: int, steps_per_repeat: int
) -> dict[str, dict]:
    """Median throughput of each candidate over interleaved repeats.

    Returns:
      {name: {"items_per_sec": median, "ms_per_step": median, "repeats_items_per_sec":
      [every repeat]}}.
    """
    for candidate in candidates:
        for _ in range(warmup_steps):
            _wait(candidate.run())
    samples = {candidate.name: [] for candidate in candidates}
    for _ in range(repeats):
        for candidate in candidates:
            start = time.perf_counter()
            for _ in range(steps_per_repeat):
                result = candidate.run()
            # Device work is asynchronous: one fetch waits for every queued step.
            _wait(result)
            samples[candidate.name].append(time.perf_counter() - start)
    results = {}
    for candidate in candidates:
        seconds = statistics.median(samples[candidate.name])
        results[candidate.name] = {
            "items_per_sec": candidate.items_per_step * steps_per_repeat / seconds,
            "ms_per_step": 1000.0 * seconds / steps_per_repeat,
            "repeats_items_per_sec": [
                candidate.items_per_step * steps_per_repeat / s for s in samples[candidate.name]
            ],
        }
    return results


def _wait(result) -> None:
    # Host-side work (None) is done when run() returns. For a tensor, a scalar fetch
    # (not the whole tensor) waits without timing a large copy.
    if result is None:
        return
    if result.shape.rank:
        result = result[(0,) * result.shape.rank]
    result.numpy()


def print_table(headers: list[str], rows: list[list]) -> None:
    """Prints rows under headers in aligned columns; None as "-"; floats below 10 with
    2 decimals (ratios), others with 1 and thousands separators."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    text = [[cell(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in text) for i in range(len(headers))]
    for index, row in enumerate(text):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_json_line(payload: dict) -> None:
    """The benchmark's last line: its results as one JSON object."""
    print(json.dumps(payload, sort_keys=True), flush=True)


def require_positive(**counts: int) -> None:
    """Raises UsageError naming the first count flag below 1."""
    from effpipe.errors import UsageError

    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"--{name}={value} must be at least 1")


@contextlib.contextmanager
def precision_policy(name: str):
    """Keras' global dtype policy set to `name` inside the block, restored after it."""
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def run_main(program: str, main) -> None:
    """`app.run(main)` with effpipe's error contract: a bad flag or input is one line
    on stderr and exit status 2 (see effpipe.cli_flags)."""
    from absl import app

    from effpipe import cli_flags
    from effpipe.errors import UsageError

    def guarded_main(argv):
        try:
            main(argv)
        except UsageError as error:
            cli_flags.exit_with_usage_error(program, error)

    app.run(guarded_main, flags_parser=cli_flags.make_flags_parser(program))


def cache_root(config) -> str:
    """Where a benchmark keeps decoded-image caches: --cache_dir, else a temporary folder
    that later runs on the same files reuse."""
    return config.data.cache_dir or os.path.join(tempfile.gettempdir(), "effpipe-cache")
