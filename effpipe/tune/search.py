"""The batch-size search and its trials, apart from any flags or model.

The largest batch that fits is found by doubling from a start until a trial fails,
then bisecting between the last fit and the first failure. A trial is anything that
answers "does this batch fit": the analytical estimate (`effpipe.tune.memory`), or one
real train step run in a fresh subprocess (`run_trial_subprocess`), since running
out of memory can leave a TensorFlow process unusable.
"""

import dataclasses
import json
import subprocess
from collections.abc import Callable

MIB = 2**20
GIB = 2**30


@dataclasses.dataclass
class Trial:
    """One answer of a trial.

    Attributes:
      batch_size: the global batch tried.
      fits: whether the train step ran inside the budget.
      peak_mib: peak device memory (measured) or the estimate, in MiB; None when
        the trial failed before measuring.
      images_per_sec: steady-state training throughput, measured trials only.
      note: why a trial failed, or what a figure means.
    """

    batch_size: int
    fits: bool
    peak_mib: float | None = None
    images_per_sec: float | None = None
    note: str = ""


def usable_budget_bytes(memory_budget_gb: float, reserved_mib: int) -> int:
    """The bytes TensorFlow's allocator gets on a card of `memory_budget_gb`.

    The CUDA context, cuDNN and cuBLAS handles live outside TensorFlow's allocator;
    `reserved_mib` is what they take from the card.
    """
    return int(memory_budget_gb * GIB) - reserved_mib * MIB


def search_max_batch(
    run_trial: Callable[[int], Trial], *, start: int = 1, max_batch: int = 1024, resolution: int = 1
) -> tuple[int, list[Trial]]:
    """The largest batch in 1..max_batch for which `run_trial` fits.

    Doubles from `start` while trials fit (halves while they fail), then bisects
    between the largest fit and the smallest failure until they are at most
    `resolution` apart. Assumes that a batch fits whenever a larger one does.

    Args:
      run_trial: answers one batch size.
      start: the first batch tried (e.g. the estimate's answer).
      max_batch: the search never tries more.
      resolution: 1 finds the exact boundary; more saves trials (on a GPU each
        compiles a model) and answers at most `resolution - 1` below it.

    Returns:
      (largest fitting batch, 0 when even 1 fails; the trials in the order run).
    """
    trials = []

    def fits(batch_size: int) -> bool:
        trial = run_trial(batch_size)
        trials.append(trial)
        return trial.fits

    start = min(max(1, start), max_batch)
    if fits(start):
        low, high = start, None
        while high is None and low < max_batch:
            candidate = min(2 * low, max_batch)
            if fits(candidate):
                low = candidate
            else:
                high = candidate
        if high is None:
            return low, trials
    else:
        low, high = 0, start
        while low == 0 and high > 1:
            candidate = high // 2
            if fits(candidate):
                low = candidate
            else:
                high = candidate
        if low == 0:
            return 0, trials
    while high - low > max(resolution, 1):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, trials


def run_trial_subprocess(argv: list[str], batch_size: int, timeout_s: float) -> Trial:
    """Runs one trial command and reads the Trial from its last stdout line (JSON).

    A trial process that reports running out of memory answers fits=False. One
    that dies without an answer (killed by the kernel's OOM killer or the driver,
    or past `timeout_s`) counts as not fitting too, with its last stderr line as
    the note; the search goes on.

    Args:
      argv: the command; it prints Trial fields as a JSON object on its last line.
      batch_size: the batch the command tries (for the failure record).
      timeout_s: seconds before the trial is killed.

    Returns:
      The trial's answer.

    Raises:
      RuntimeError: the trial failed for a reason other than memory (it printed
        {"error": ...}): a bug or bad input, which no other batch would fix.
    """
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Trial(batch_size, False, note=f"no answer within {timeout_s:g} s (killed)")
    lines = completed.stdout.strip().splitlines()
    answer = None
    if lines:
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            answer = None
    if isinstance(answer, dict) and "error" in answer:
        raise RuntimeError(f"the trial at batch {batch_size} failed: {answer['error']}")
    if isinstance(answer, dict) and "fits" in answer:
        return Trial(**{**answer, "batch_size": batch_size})
    last_error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
    return Trial(
        batch_size,
        False,
        note=f"the trial process died (exit status {completed.returncode}): {last_error[:200]}",
    )
