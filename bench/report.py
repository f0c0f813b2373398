"""Benchmark reporting: markdown tables of the grid and of loop scenarios, the grid's PNG plot.

Metrics live in :mod:`tokprune.bench.metrics`; this module only formats results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["loop_markdown", "markdown", "plot"]


def _fmt(x: Any, spec: str = ".3f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def markdown(result: Any) -> str:
    """The result as markdown: per-bucket latency vs MAC ratio, the acceptance line, then the grid (last)."""
    m = result.meta
    s = m["settings"]
    head = (
        f"Model {m['model']['name']}" + (f" ({m['layers']} layers, hidden {m['hidden']})" if m.get("layers") else "")
        + f", {s['height']}x{s['width']} px, "
        f"N={m['image_tokens']} image + T={m['text_tokens']} text tokens, batch {m['batch']} (CFG), {s['steps']} steps, "
        f"guidance {s['guidance']:g}, budget {m['budget']:g}; {len(m['prompts'])} prompts x {m['runs']} runs "
        f"(+{m['warmup']} warm-up); device {m['device']}, {m['torch_threads']} threads."
    )
    lines = [head]
    if result.buckets:
        lines += [
            "",
            "Per bucket (pruned arms): latency vs the same backend's dense latency x MAC ratio, measured in the "
            "same interleaved run (step = whole transformer step incl. selection; call = engine call incl. cache "
            "scatter). MACs count what runs: a `-probe` bucket is the dense call plus the text-importance probe, "
            "run only at the steps before text pruning; every other dense step runs the plain dense bucket.",
            "",
            "| backend | bucket | steps | MAC ratio | step median (s) | predicted | error | call median (s) | predicted | error |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in result.buckets:
            lines.append(
                f"| {b['backend']} | {b['bucket']} | {b['steps']} | {b['mac_ratio']:.3f} | {_fmt(b.get('step_median_s'), '.4f')} | "
                f"{_fmt(b.get('step_predicted_s'), '.4f')} | {_fmt(b.get('step_error_pct'), '+.1f')}% | "
                f"{_fmt(b.get('call_median_s'), '.4f')} | {_fmt(b.get('call_predicted_s'), '.4f')} | "
                f"{_fmt(b.get('call_error_pct'), '+.1f')}% |"
            )
    a = result.acceptance
    if "ort_pruned_speedup" in a:
        lines += [
            "",
            f"Acceptance: ONNX Runtime pruned speedup vs eager dense {a['ort_pruned_speedup']:.2f}x (need >= 1.8: "
            f"{'PASS' if a['ort_pruned_speedup_ok'] else 'FAIL'}); every ORT bucket call within "
            f"{a['bucket_mac_tolerance_pct']:.0f}% of its MAC prediction: {'PASS' if a['buckets_within_tolerance'] else 'FAIL'}.",
        ]
    lines += [
        "",
        "| backend | mode | loop median (s) | spread IQR | speedup | e2e (s) | e2e speedup | MAC frac | peak mem (MiB) "
        "| PSNR img (dB) | SSIM img | PSNR lat (dB) | SSIM lat |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        mode = "pruned" if r["pruned"] else "dense"
        if r.get("status") != "ok":
            lines.append(f"| {r['backend']} | {mode} | skipped: {r.get('reason', '')} | | | | | | | | | | |")
            continue
        base = r["backend"] == "eager" and not r["pruned"]
        same = r["identical_to_baseline"]
        lines.append(
            f"| {r['backend']} | {mode} | {_fmt(r['median_s'])} | ±{_fmt(r['spread_pct'], '.1f')}% | "
            f"{_fmt(r['speedup'], '.2f')}x | {_fmt(r['e2e_median_s'])} | {_fmt(r['e2e_speedup'], '.2f')}x | "
            f"{_fmt(r['mac_fraction'], '.3f')} | {_fmt(r['peak_mem_mib'], '.0f')} | "
            f"{'ref' if base else 'identical' if same else _fmt(r['psnr_db'], '.1f')} | "
            f"{'ref' if base else _fmt(r['ssim'], '.4f')} | "
            f"{'ref' if base else 'identical' if r['latent_psnr_db'] is None else _fmt(r['latent_psnr_db'], '.1f')} | "
            f"{'ref' if base else _fmt(r['latent_ssim'], '.4f')} |"
        )
    return "\n".join(lines)


def plot(result: Any, path: str | Path) -> Path:
    """Bar charts of speedup vs eager dense and image PSNR vs eager dense, per backend and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.get("status") == "ok"]
    labels = [r["label"] for r in rows]
    colors = ["tab:orange" if r["pruned"] else "tab:blue" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(rows)), 4.5))
    ax1.bar(labels, [r["speedup"] for r in rows], color=colors)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_ylabel("denoising-loop speedup vs eager dense (x)")
    cap = 100.0
    vals = [cap if (r["psnr_db"] is None) else min(cap, r["psnr_db"]) for r in rows]
    ax2.bar(labels, vals, color=colors)
    ax2.set_ylabel(f"image PSNR vs eager dense, dB (cap {cap:.0f})")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
        for lab in ax.get_xticklabels():
            lab.set_ha("right")
    m = result.meta
    fig.suptitle(f"{m['model']['name']}: N={m['image_tokens']}, {m['settings']['steps']} steps, budget {m['budget']:g}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loop_markdown(result: dict[str, Any]) -> str:
    """A loop scenario's result (:func:`tokprune.bench.scenarios.gpu_ready.run_scenario`) as markdown, rows last."""
    g, sc, env = result["geometry"], result["scenario"], result["environment"]
    lines = [
        f"{env['device_name']}, {sc['arch']}, N={g['N']}, T={g['T']}, batch {g['batch']}, {sc['steps']} steps, {sc['dtype']}"
        + (" (tiny: plumbing only, measures nothing)" if sc["arch"] == "tiny" else ""),
        "",
        "| backend | bucket | MAC ratio | ms | predicted | vs prediction |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in result["buckets"]:
        lines.append(f"| {b['mode']} | {b['bucket']} | {b['mac_ratio']:.3f} | {b['ms']:.2f} | {b['predicted_ms']:.2f} | "
                     f"{b['vs_prediction']:+.1%} |")
    if "memory" in result:
        m = result["memory"]
        lines += ["", f"memory ({m['backend']}, {m['buckets']} buckets): one graph {m['one_graph_bytes'] / 2**30:.2f} GiB, "
                      f"one session per bucket {m['one_session_per_bucket_bytes'] / 2**30:.2f} GiB"]
    lines += [""] + [f"- {k}: {v}" for k, v in {**result["checks"], **result["errors"]}.items()]
    lines.append(f"- targets (None: not measured): {result.get('targets')}")
    lines += ["", "| mode | MAC fraction | loop | vs eager dense | peak GiB above the weights |", "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        ms = "failed" if r["loop_ms"] is None else f"{r['loop_ms']:.1f} ms"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['mode']} | {r['mac_fraction']:.3f} | {ms} | {speed} | "
                     f"{_fmt(r['peak_gib'], '.2f')} |")
    return "\n".join(lines)
