"""Runs a check's parts as subprocesses against one deadline, keeping what each measured.

`Runner.run(part)` starts the part in its own process group with its own timeout, cut
to what is left of the deadline (a part that no longer fits is skipped, saying so),
reads its final JSON line through the part's `read`, and rewrites the report file
after every part, so a check that is killed or runs out of time keeps every figure it
had. `stop` is the SIGTERM/SIGINT handler that kills the running parts. Used by
`benchmarks.gpu_check`; no TensorFlow import.
"""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from effpipe import run_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fault injection for the tests: the parts named here (comma-separated) run a
# command that fails instead of their own.
FAIL_ENV = "EFFPIPE_GPU_CHECK_FAIL"
# Lines of a failed part's stderr kept in the JSON file.
STDERR_TAIL_LINES = 15

# The parts' processes now running, and whether SIGTERM or SIGINT asked the check to
# stop: it then kills them (their own sessions do not get the signal), skips the
# rest, and still writes the file.
LIVE: set = set()
STOPPED_BY: list[int] = []


@dataclasses.dataclass
class Part:
    """One subprocess of the check.

    Attributes:
      name: its key in the JSON file.
      argv: the arguments after the Python interpreter (`-m module --flags`).
      timeout_s: its own limit, cut to what is left of the deadline.
      needs_s: it is skipped when less than this is left.
      read: (its final JSON line or None) -> its figures; raises ValueError when the
        output is not what a successful run prints.
      env: environment variables added to the check's own.
      what: one line for the plan.
    """

    name: str
    argv: list[str]
    timeout_s: float
    needs_s: float
    read: Callable[[dict | None], dict]
    env: dict = dataclasses.field(default_factory=dict)
    what: str = ""


def run_command(argv, *, timeout_s, env, log_prefix) -> dict:
    """Runs `argv` in its own process group; stdout and stderr go to log files.

    Returns:
      {"status": "ok" | "failed" | "timed_out", "returncode", "wall_s",
      "final_json": its last stdout line parsed (None if not a JSON object),
      "stderr_tail": its last lines of stderr}.
    """
    start = time.monotonic()
    with open(log_prefix + ".stdout", "w") as out, open(log_prefix + ".stderr", "w") as err:
        # A session of its own, so a timeout kills the part's children too.
        process = subprocess.Popen(
            argv, stdout=out, stderr=err, env=env, cwd=REPO_ROOT, start_new_session=True
        )
        LIVE.add(process)
        try:
            returncode = process.wait(timeout=max(timeout_s, 0.1))
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            returncode, status = process.returncode, "timed_out"
        finally:
            LIVE.discard(process)
    if STOPPED_BY and status != "ok":
        status = "interrupted"
    wall_s = time.monotonic() - start
    with open(log_prefix + ".stdout") as file:
        lines = [line for line in file.read().splitlines() if line.strip()]
    with open(log_prefix + ".stderr") as file:
        stderr_tail = [line[:300] for line in file.read().splitlines()[-STDERR_TAIL_LINES:]]
    final_json = None
    if lines:
        try:
            final_json = json.loads(lines[-1])
        except json.JSONDecodeError:
            final_json = None
    if not isinstance(final_json, dict):
        final_json = None
    return {
        "status": status,
        "returncode": returncode,
        "wall_s": round(wall_s, 1),
        "final_json": final_json,
        "stderr_tail": stderr_tail,
    }


def stop(signum, frame) -> None:
    """The check's SIGTERM and SIGINT handler: kills the running parts' process groups."""
    del frame
    STOPPED_BY.append(signum)
    for process in list(LIVE):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group(process: subprocess.Popen) -> None:
    # SIGTERM first (TensorFlow exits cleanly), SIGKILL if it lingers.
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    """Runs parts, one at a time, against one deadline and rewrites the JSON file
    after each."""

    def __init__(self, output: str, deadline_s: float, report: dict, selected=None):
        self.output = output
        self.logs = os.path.splitext(output)[0] + "_logs"
        os.makedirs(self.logs, exist_ok=True)
        self.deadline = time.monotonic() + deadline_s
        self.report = report
        self.report.setdefault("parts", {})
        self.selected = selected
        self.failing = set(filter(None, os.environ.get(FAIL_ENV, "").split(",")))
        self.write()

    def run(self, part: Part) -> dict:
        """Runs `part` (or records why not); returns its record."""
        left_s = self.deadline - time.monotonic()
        if self.selected is not None and part.name not in self.selected:
            return self.skip(part.name, "not in --parts")
        if STOPPED_BY:
            return self.skip(part.name, "the check was interrupted")
        if left_s <= 0 or left_s < part.needs_s:
            return self.skip(
                part.name, f"{left_s:.0f} s left of the deadline; it needs {part.needs_s:.0f} s"
            )
        argv = [sys.executable, *part.argv]
        if part.name in self.failing:
            argv = [sys.executable, "-c", f"import sys; sys.exit('injected failure ({FAIL_ENV})')"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **part.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
        print(f"{part.name}: running (at most {min(part.timeout_s, left_s):.0f} s)", flush=True)
        outcome = run_command(
            argv,
            timeout_s=min(part.timeout_s, left_s),
            env=env,
            log_prefix=os.path.join(self.logs, part.name),
        )
        record = {
            "status": outcome["status"],
            "wall_s": outcome["wall_s"],
            "command": shlex.join(["python", *part.argv]),
            "log": os.path.join(self.logs, part.name) + ".{stdout,stderr}",
        }
        if outcome["status"] == "ok":
            try:
                record["figures"] = part.read(outcome["final_json"])
            except (ValueError, KeyError, TypeError, OSError) as error:
                record.update(status="failed", error=f"{type(error).__name__}: {error}")
        if outcome["status"] != "ok" or record["status"] != "ok":
            record["returncode"] = outcome["returncode"]
            record["stderr_tail"] = outcome["stderr_tail"]
        record["result"] = outcome["final_json"]
        print(f"{part.name}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        return self.record(part.name, record)

    def skip(self, name: str, reason: str) -> dict:
        print(f"{name}: skipped ({reason})", flush=True)
        return self.record(name, {"status": "skipped", "wall_s": 0.0, "reason": reason})

    def record(self, name: str, record: dict) -> dict:
        self.report["parts"][name] = record
        self.write()
        return record

    def write(self) -> None:
        # Written atomically: a reader (or a killed check) never sees half a file.
        # The parts stay in the order they ran.
        run_dir.write_text(self.output, json.dumps(self.report, indent=1) + "\n")
