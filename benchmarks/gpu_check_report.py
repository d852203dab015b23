"""What `benchmarks.gpu_check` makes of its parts: the summary tables, the targets, and
a record per part under --results_dir (benchmarks.records). No TensorFlow import."""

import sys

from benchmarks import harness, records, step_report
from benchmarks.gpu_check_parts import PEER, REPLICA

# effpipe's phase-1 step, fed, against the replica as it ran.
PHASE1_TARGET_SPEEDUP = step_report.GPU_PHASE1_TARGET_SPEEDUP
# effpipe fed and augmenting against the keras_recipe peer, each phase.
PEER_TARGET_SPEEDUP = step_report.GPU_TARGET_SPEEDUP_VS_KERAS_RECIPE


def summarize(parts: dict) -> dict:
    """The step settings side by side, each against the replica of its phase (in
    images/s: the 8 GB parts run another batch); and every part that timed effpipe fed
    and augmenting beside the keras_recipe peer."""
    replica = {}
    for record in parts.values():
        result = record.get("result") or {}
        if record["status"] == "ok" and result.get("benchmark") == "step_throughput":
            for name in REPLICA:
                if name in result["configurations"]:
                    rate = result["configurations"][name]["images_per_sec"]
                    replica[(result["phase"], name)] = rate
    steps, peers = [], []
    for name, record in parts.items():
        result = record.get("result") or {}
        if record["status"] != "ok" or result.get("benchmark") != "step_throughput":
            continue
        figures = record["figures"]
        if all(f"{c}/ms_per_step" in figures for c in PEER):
            peers.append(summarize_peer(name, result, figures))
        if "effpipe/noaug/synthetic/ms_per_step" in figures:
            steps.append(summarize_step(name, result, figures, replica))
    summary = {
        "steps": steps,
        "peers": peers,
        "replica_images_per_sec": {f"phase{p}/{n}": v for (p, n), v in replica.items()},
    }
    for peer in peers:
        if peer["part"].startswith("peer_"):
            summary[f"target_phase{peer['phase']}_speedup_vs_keras_recipe"] = {
                "value": peer["speedup_vs_keras_recipe"],
                "limit": PEER_TARGET_SPEEDUP,
                "met": peer["speedup_vs_keras_recipe"] >= PEER_TARGET_SPEEDUP,
            }
    headline = [step for step in steps if step["part"] == "step_p1_mixed_xla_on"]
    speedup = headline[0]["fed_speedup_vs_replica_as_run"] if headline else None
    if speedup is not None:
        summary["target_phase1_speedup_vs_replica_as_run"] = {
            "value": speedup,
            "limit": PHASE1_TARGET_SPEEDUP,
            "met": speedup >= PHASE1_TARGET_SPEEDUP,
        }
    return summary


def summarize_step(name: str, result: dict, figures: dict, replica: dict) -> dict:
    """One part's effpipe compute and fed steps against the replica of its phase."""
    phase = result["phase"]
    compute = figures["effpipe/noaug/synthetic/images_per_sec"]
    fed = figures.get("effpipe/noaug/pipeline/images_per_sec")
    notebook, notebook_fed = (replica.get((phase, f"notebook/{c}")) for c in ("synthetic", "numpy"))
    return {
        "part": name,
        "phase": phase,
        "precision": result["precision"],
        "xla": result["xla"],
        "batch_size": result["batch_size"],
        "ms_per_step": figures["effpipe/noaug/synthetic/ms_per_step"],
        "images_per_sec": compute,
        "peak_memory_mb": figures.get("effpipe/noaug/synthetic/peak_memory_mb"),
        "fed_ms_per_step": figures.get("effpipe/noaug/pipeline/ms_per_step"),
        "speedup_vs_replica": compute / notebook if notebook else None,
        "fed_speedup_vs_replica_as_run": fed / notebook_fed if fed and notebook_fed else None,
        "augment_share_of_step": figures.get("target/augment_share_of_step"),
    }


def summarize_peer(name: str, result: dict, figures: dict) -> dict:
    """One part's effpipe (fed, augmenting) against the keras_recipe peer."""
    effpipe_ms, peer_ms = (figures[f"{c}/ms_per_step"] for c in PEER)
    return {
        "part": name,
        "phase": result["phase"],
        "precision": result["precision"],
        "xla": result["xla"],
        "ms_per_step": effpipe_ms,
        "images_per_sec": figures[f"{PEER[0]}/images_per_sec"],
        "keras_recipe_ms_per_step": peer_ms,
        "keras_recipe_images_per_sec": figures[f"{PEER[1]}/images_per_sec"],
        "speedup_vs_keras_recipe": peer_ms / effpipe_ms,
    }


def print_summary(report: dict) -> None:
    rows = []
    for name, record in report["parts"].items():
        note = record.get("reason") or record.get("error") or ""
        if not note and record["status"] != "ok":
            note = (record.get("stderr_tail") or [""])[-1][:100]
        rows.append([name, record["status"], record["wall_s"], note])
    harness.print_table(["part", "status", "wall s", "note"], rows)
    steps = report["summary"]["steps"]
    if steps:
        print()
        harness.print_table(
            ["phase", "precision", "XLA", "batch", "ms/step", "images/s", "peak MB",
             "fed ms/step", "x replica", "x replica fed", "aug share"],
            [[s["phase"], s["precision"], "on" if s["xla"] else "off", s["batch_size"],
              s["ms_per_step"],
              s["images_per_sec"], s["peak_memory_mb"], s["fed_ms_per_step"],
              s["speedup_vs_replica"], s["fed_speedup_vs_replica_as_run"],
              s["augment_share_of_step"]] for s in steps],
        )  # fmt: skip
    peers = report["summary"]["peers"]
    if peers:
        print()
        harness.print_table(
            ["peer part", "phase", "precision", "XLA", "ms/step", "keras_recipe ms/step",
             "x keras_recipe"],
            [[p["part"], p["phase"], p["precision"], "on" if p["xla"] else "off",
              p["ms_per_step"], p["keras_recipe_ms_per_step"], p["speedup_vs_keras_recipe"]]
             for p in peers],
        )  # fmt: skip
    headline = report["parts"].get("headline", {})
    if headline.get("status") == "ok":
        print()
        print_headline(headline["result"])
    target = report["summary"].get("target_phase1_speedup_vs_replica_as_run")
    if target:
        print(
            f"target: phase-1 step (mixed, XLA, fed) {target['value']:.2f}x the replica as it "
            f"ran, against {target['limit']:g}x: {'met' if target['met'] else 'MISSED'}"
        )
    for phase in (1, 2):
        target = report["summary"].get(f"target_phase{phase}_speedup_vs_keras_recipe")
        if target:
            print(
                f"target: phase-{phase} step (mixed, XLA, fed, augmenting) {target['value']:.2f}x "
                f"keras_recipe, against {target['limit']:g}x: "
                f"{'met' if target['met'] else 'MISSED'}"
            )


def print_headline(result: dict) -> None:
    """The headline run's waits and speeds and, with its profile, phase 1's heaviest
    device ops (benchmarks.headline_run prints it too)."""
    harness.print_table(
        ["", "first step after s", "images/s"],
        [[f"phase {n}", result["first_step_seconds"].get(f"phase{n}"),
          result["images_per_sec"][f"phase{n}"]] for n in (1, 2)],
    )  # fmt: skip
    print(
        f"{result['variant']} at {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['precision']}, XLA {'on' if result['xla'] else 'off'} on {result['device']}: "
        f"start to phase 1 {result['startup_seconds']:.1f} s; export "
        f"{result['export_mb']:.1f} MB; the command {result['wall_seconds']:.0f} s"
    )
    profile = result.get("profile")
    if profile and "error" in profile:
        print(f"phase-1 profile: none ({profile['error']})")
    elif profile:
        print(
            f"phase-1 profile ({profile['steps']} steps, {profile['device']}): "
            f"{profile['trace_ms_per_step']:.1f} ms/step traced, device busy "
            f"{profile['device_busy_ms_per_step']:.1f}, waiting for input "
            f"{profile['input_wait_ms_per_step']:.1f}"
        )
        # On the host, op types say more than single nodes.
        ops = profile.get("top_types") or profile["top_ops"]
        harness.print_table(
            ["op", "ms", "count", "share"],
            [[op["name"], op["total_ms"], op["count"], op["share"]] for op in ops],
        )


def record_gpu_check(report: dict) -> list[str]:
    """Writes one record per part of `benchmarks.gpu_check` that succeeded, when
    --results_dir is set: gpu_check-<gpu>-<part>, with the part's figures, its summary
    row (effpipe against the replica) under summary/, and the part's command."""
    if not records.RESULTS_DIR.value:
        return []
    gpus = report.get("tensorflow_gpus")
    if not isinstance(gpus, list) or not gpus:
        gpus = report["nvidia_smi"] if isinstance(report.get("nvidia_smi"), list) else []
    gpu = records.device_tag(gpus[0]["name"]) if gpus else "none"
    summary = report.get("summary", {})
    paths = []
    for part, result in report["parts"].items():
        if result["status"] != "ok":
            continue
        figures = dict(result["figures"])
        payload = result.get("result") or {}
        describe = records.DESCRIBE.get(payload.get("benchmark"))
        what = describe(payload)[1] if describe else f"gpu_check's {part.replace('_', ' ')}"
        # Its rows of the summary: against the replica (summary/), the peer (peer/).
        for table, prefix in (("steps", "summary"), ("peers", "peer")):
            for row in summary.get(table, []):
                if row["part"] == part:
                    figures.update(
                        {f"{prefix}/{k}": v for k, v in row.items() if records.is_number(v)}
                    )
        paths.append(
            records.write_record(
                f"gpu_check-{gpu}-{part}",
                figures,
                command=result["command"],
                notes=f"part {part} of `{report['command']}`",
                what=what,
                headline=gpu_check_headline(figures),
                results_dir=records.RESULTS_DIR.value,
            )
        )
    for path in paths:
        print(f"record: {path}", file=sys.stderr)
    return paths


def gpu_check_headline(figures: dict) -> str:
    """A gpu_check part's figures in one line, whichever kind of part it is."""
    peer = (
        "effpipe fed and augmenting {peer/ms_per_step:.1f} ms/step against keras_recipe's "
        "{peer/keras_recipe_ms_per_step:.1f} ({peer/speedup_vs_keras_recipe:.3g}x)"
    )
    if "summary/ms_per_step" not in figures and "peer/ms_per_step" in figures:
        return peer
    if "summary/ms_per_step" in figures:
        text = "{summary/ms_per_step:.1f} ms/step ({summary/images_per_sec:,.0f} images/s)"
        if figures.get("summary/fed_ms_per_step") is not None:
            text += ", {summary/fed_ms_per_step:.1f} fed"
        if figures.get("summary/fed_speedup_vs_replica_as_run") is not None:
            text += "; {summary/fed_speedup_vs_replica_as_run:.3g}x the notebook as run"
        if "effpipe/aug/synthetic/ms_per_step" in figures:
            text += "; augmenting {effpipe/aug/synthetic/ms_per_step:.1f} ms/step"
        if figures.get("summary/peak_memory_mb") is not None:
            text += "; peak {summary/peak_memory_mb:,.0f} MB"
        if "peer/ms_per_step" in figures:
            text += "; " + peer
        return text
    sizes = [key.split("/")[0] for key in figures if key.endswith("px/fused_images_per_sec")]
    if sizes:
        return "; ".join(
            f"{size.removesuffix('px')} px: {{{size}/fused_images_per_sec:,.0f}} images/s against "
            f"{{{size}/keras_chain_images_per_sec:,.0f}} ({{{size}/speedup:.3g}}x)"
            for size in sizes
        )
    if "phase1_max_batch" in figures:
        return "largest batch {phase1_max_batch} in phase 1, {phase2_max_batch} in phase 2"
    if "first_step_seconds/phase1" in figures:
        return records.HEADLINE_RUN
    keys = [key for key, value in figures.items() if records.is_number(value)]
    return "; ".join(f"{key} {{{key}:,.4g}}" for key in keys)
