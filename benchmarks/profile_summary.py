"""Profile summary: top ops, device busy time and input wait per step of a profiler trace.

    python -m benchmarks.profile_summary --trace_dir=WORKDIR/tensorboard/phase1

Reads the newest `*.xplane.pb` under --trace_dir: Keras' TensorBoard callback with
profile_batch=(first, last), as the trainer's --profile_steps, writes
DIR/train/plugins/profile/<time>/<host>.xplane.pb, with an event per traced step.
The ops: on a GPU, the first /device:GPU:N plane's kernels and copies on its "Stream #N(...)"
lines, as CUPTI's collector names them (xprof's op stats too skip the lines it derives,
"XLA Ops", "XLA Modules", "TensorFlow Ops", "Launch Stats": the same kernels again). Else
the host plane /host:CPU, which has no "TensorFlow Ops" line before xprof derives one:
there an op execution is an event "node:OpType" on the thread that ran it (tf_Compute/*
for the step, tf.data's threads for its functions), all counted, and a step XLA
compiled for the CPU runs HLO ops, events with an "hlo_op" stat. Busy time is the union
of the op intervals (streams and threads overlap), op time their sum, which shares divide.
Input wait is the union of the host's IteratorGetNext[AsOptional]Op::DoCompute events
(tf.data's get-next kernels; each replica's under MirroredStrategy).
"""

import collections
import glob
import importlib
import math
import os
import re

from absl import flags

from benchmarks import harness
from effpipe.errors import UsageError

PROGRAM = "benchmarks.profile_summary"
# TensorFlow's protobuf of the trace, at a private path of TensorFlow 2.21: setup.cfg
# pins tensorflow<2.22 for this, and tests/test_profile_summary.py fails if it moves.
XPLANE_PB2_MODULE = "tensorflow.tsl.profiler.protobuf.xplane_pb2"
HOST_PLANE, GPU_PLANE_PREFIX, STREAM_LINE_PREFIX = "/host:CPU", "/device:GPU:", "Stream #"
GET_NEXT_EVENTS = ("IteratorGetNextOp::DoCompute", "IteratorGetNextAsOptionalOp::DoCompute")
# Keras' TensorBoard callback traces each profiled batch as an event of this name.
PROFILED_BATCH = "Profiled batch"
HLO_OP_STAT = "hlo_op"
NAME_LENGTH, PS_PER_MS = 80, 1e9
# An op execution on a host thread: node name (node names hold no ":"), then OpType.
_TF_OP = re.compile(r"^[^:\s]+:([A-Z_]\w*)$")
_CALL_PREFIX = re.compile(r"^(?:\w*PartitionedCall(?:_\d+)?/)+")


_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "A folder holding a profiler trace.")
_TOP = flags.DEFINE_integer("top", 10, "Ops to list, heaviest first.")


def summarize(log_dir: str, steps: int | None = None, top: int = 10) -> dict:
    """The newest trace under `log_dir`, per step (see the module docstring); `steps`:
    the steps it traced (default: the Keras "Profiled batch" events it holds).

    Returns:
      {trace, device, steps, profiled_batches, top_ops: [{name, type, total_ms, count,
      share}], top_types (the same per type; empty on GPUs), op_ms_per_step, device_busy_ms_per_step, input_wait_ms_per_step,
      trace_ms, trace_ms_per_step, trace_errors}; type is the TF op type, or an HLO op's
      without its number (None on GPUs).
    """
    path = find_trace(log_dir)
    space = read_space(path)
    host = next((plane for plane in space.planes if plane.name == HOST_PLANE), None)
    device, ops = _device_ops(space.planes, host) if host else (None, [])
    if not ops:
        raise ValueError(f"{path} holds no op executions to summarize")
    host_events = list(_events(host))
    profiled_batches = sum(name == PROFILED_BATCH for _, name, *_ in host_events)
    steps = steps or profiled_batches
    if steps < 1:
        raise ValueError(f"{path}: no traced steps (no {PROFILED_BATCH!r} event); pass steps")
    timed = host_events + ([] if device is host else list(_events(device)))
    get_next = [(start, end) for _, name, start, end, _ in host_events if name in GET_NEXT_EVENTS]
    op_ps = sum(end - start for *_, start, end in ops)
    trace_ms = (max(event[3] for event in timed) - min(event[2] for event in timed)) / PS_PER_MS
    return {
        "trace": path,
        "device": device.name,
        "steps": steps,
        "profiled_batches": profiled_batches,
        "top_ops": _top_ops(ops, op_ps, top),
        # On the host, the same by op type (convolutions, casts...): one node is little.
        "top_types": _top_ops([(kind, kind, *span) for _, kind, *span in ops if kind], op_ps, top),
        "op_ms_per_step": op_ps / PS_PER_MS / steps,
        "device_busy_ms_per_step": _union_ps([op[2:] for op in ops]) / PS_PER_MS / steps,
        "input_wait_ms_per_step": _union_ps(get_next) / PS_PER_MS / steps,
        "trace_ms": trace_ms,
        "trace_ms_per_step": trace_ms / steps,
        "trace_errors": list(space.errors),
    }


def find_trace(log_dir: str) -> str:
    """The newest `*.xplane.pb` under `log_dir`; FileNotFoundError naming it if none."""
    paths = glob.glob(os.path.join(glob.escape(log_dir), "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(
            f"no profiler trace (*.xplane.pb) under {log_dir}: trace steps with "
            "keras.callbacks.TensorBoard(profile_batch=(first, last)) (--profile_steps)"
        )
    return max(paths, key=os.path.getmtime)


def read_space(path: str):
    """The XSpace in `path`, parsed with TensorFlow's own protobuf class."""
    with open(path, "rb") as file:
        return importlib.import_module(XPLANE_PB2_MODULE).XSpace.FromString(file.read())


def _device_ops(planes, host):
    """(plane, [(name, op type, start ps, end ps)]) of the ops to summarize."""
    gpus = [plane for plane in planes if plane.name.startswith(GPU_PLANE_PREFIX)]
    for plane in sorted(gpus, key=lambda plane: (len(plane.name), plane.name)):  # 2 < 10
        kernels = [e for e in _events(plane) if e[0].name.startswith(STREAM_LINE_PREFIX)]
        if kernels:
            return plane, [(name, None, start, end) for _, name, start, end, _ in kernels]
    # On the host: TensorFlow's ops, and the HLO ops of a step XLA compiled for the CPU
    # (events with an hlo_op stat, named "convolution.3"; their type drops the number).
    hlo = {id_ for id_, stat in host.stat_metadata.items() if stat.name == HLO_OP_STAT}
    ops = []
    for _, name, start, end, event in _events(host):
        match = _TF_OP.match(name)
        if match:
            ops.append((name, match[1], start, end))
        elif any(stat.metadata_id in hlo for stat in event.stats):
            ops.append((name, re.sub(r"\.\d+$", "", name), start, end))
    return host, ops


def _events(plane):
    """(line, event name, start ps, end ps, event) of each event of `plane`, on one
    clock."""
    for line in plane.lines:
        for event in line.events:
            if event.WhichOneof("data") != "offset_ps":
                continue  # an aggregate (num_occurrences), without a time
            start = line.timestamp_ns * 1000 + event.offset_ps
            name = plane.event_metadata[event.metadata_id].name
            yield line, name, start, start + event.duration_ps, event


def _top_ops(ops, op_ps: int, top: int) -> list[dict]:
    totals = collections.Counter()
    for name, op_type, start, end in ops:
        totals[name, op_type] += end - start
    counts = collections.Counter((name, op_type) for name, op_type, _, _ in ops)
    return [
        {
            "name": _short_name(name),
            "type": op_type,
            "total_ms": round(total / PS_PER_MS, 4),
            "count": counts[name, op_type],
            "share": round(total / op_ps, 4),
        }
        for (name, op_type), total in totals.most_common(top)
    ]


def _short_name(name: str) -> str:
    """`name` without the function-call scopes TensorFlow prefixes, at most NAME_LENGTH."""
    name = _CALL_PREFIX.sub("", name)
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 3] + "..."


def _union_ps(intervals: list[tuple[int, int]]) -> int:
    """Picoseconds covered by at least one of `intervals`."""
    covered, reach = 0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered, reach = covered + end - max(start, reach), end
    return covered


def main(argv):
    from effpipe import cli_flags

    cli_flags.refuse_arguments(PROGRAM, argv)
    if not _TRACE_DIR.value:
        raise UsageError("--trace_dir=DIR is required: a folder holding a profiler trace")
    harness.require_positive(top=_TOP.value)
    try:
        summary = summarize(_TRACE_DIR.value, top=_TOP.value)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    steps = summary["steps"]
    print(f"{summary['trace']}: {summary['device']}, {steps} steps")
    rows = [[op["name"], op["total_ms"], op["count"], op["share"]] for op in summary["top_ops"]]
    harness.print_table(["op", "total ms", "count", "share"], rows)
    for key in ("device_busy", "op", "input_wait", "trace"):
        print(f"{key}_ms_per_step: {summary[key + '_ms_per_step']:.3f}")
    harness.print_json_line({"benchmark": "profile_summary", **summary})


if __name__ == "__main__":
    harness.run_main(PROGRAM, main)
