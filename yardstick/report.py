"""Aggregate the stored records of a comparison into means with bootstrap intervals, findings, markdown and a plot.

Everything here is computed from the records (:mod:`tokprune.yardstick.store`), so the report can be
rebuilt at any time, also from a partial (interrupted) run: ``tokprune-quality --report-only``.

Metrics per caption (pruned vs dense image of the same caption and seed): ``psnr`` (dB, capped at
:data:`~tokprune.yardstick.metrics.PSNR_CAP_DB`), ``ssim``, ``iou`` (per-object mask IoU against
the dense image's objects), ``acc`` (checker attribute accuracy of the image vs its caption) and
``latent_err`` (relative L2 of the final latents). Each row's mean has a seeded percentile-bootstrap
95% interval over captions; comparisons against ``calibrated`` use paired per-caption differences.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tokprune.yardstick.metrics import PSNR_CAP_DB, bootstrap_ci, half_width

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "aggregate", "findings", "markdown", "plot", "table"]

METRICS: tuple[str, ...] = ("psnr", "ssim", "iou", "acc", "latent_err")
HIGHER_BETTER = {"psnr": True, "ssim": True, "iou": True, "acc": True, "latent_err": False}
TARGETS_DB = {0.5: 40.0, 0.3: 32.0}  # the PSNR targets vs dense
MAC_TOL = 0.01
# Below these the dense re-run reads "no difference" (float round-off, not noise): no ratio is stated.
NOISE_RESOLUTION = {"psnr": 1e-9, "iou": 1e-9, "ssim": 1e-6, "latent_err": 1e-9}


def _concat(chunks: list[dict[str, Any]], key: str, n: int) -> np.ndarray | None:
    vals: list[float] = []
    for c in sorted(chunks, key=lambda c: c["start"]):
        v = c.get(key)
        if v is None:
            return None
        vals += [float(x) for x in v]
    return np.asarray(vals[:n], dtype=np.float64)


def _last_run(records: list[dict[str, Any]]) -> int:
    """Index of the last measuring run's first record (its ``versions`` record; 0 if none)."""
    return max((i for i, r in enumerate(records) if r.get("kind") == "versions"), default=0)


def aggregate(records: list[dict[str, Any]], n: int, *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per row: metrics' means and intervals over the first ``n`` captions, MAC fraction, plan, timing."""
    plans = {r["row"]: r for r in records if r.get("kind") == "plan"}
    macs = {r["row"]: r for r in records if r.get("kind") == "macs"}
    chunks: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "chunk" and r["start"] < n:
            chunks.setdefault(r["row"], []).append(r)
    rows = []
    per_caption: dict[str, dict[str, np.ndarray]] = {}
    for name, cs in chunks.items():
        first = cs[0]
        vals = {m: _concat(cs, m, n) for m in METRICS}
        per_caption[name] = {m: v for m, v in vals.items() if v is not None}
        row: dict[str, Any] = {
            "row": name,
            "method": first["method"],
            "budget": first.get("budget"),
            "n": int(len(vals["psnr"])),
            "seconds": round(sum(c["seconds"] for c in cs), 1),
        }
        for m, v in vals.items():
            if v is not None and len(v):
                mean, lo, hi = bootstrap_ci(v, resamples=resamples, seed=seed)
                row[m] = {"mean": mean, "lo": lo, "hi": hi}
        if first.get("mac_fraction") is not None:  # cache rows: counted per caption
            mf = _concat(cs, "mac_fraction", n)
            row["mac_fraction"] = float(mf.mean())
            row["mac_fraction_range"] = [float(mf.min()), float(mf.max())]
        elif name in macs:
            row["mac_fraction"] = float(macs[name]["fraction"])
            row["mac_fraction_analytic"] = float(macs[name]["analytic"])
        if name in plans:
            row["plan"] = plans[name]["plan"]
            row["policy"] = plans[name]["policy"]
            row["info"] = plans[name]["info"]
        if first.get("identical_to"):
            row["identical_to"] = first["identical_to"]
        if first.get("settings") is not None:
            row["settings"] = first["settings"]
        rows.append(row)
    order = {"dense-rerun": 0, "calibrated": 1, "cat": 2, "ras": 3, "interleaved": 4, "random": 5}
    rows.sort(key=lambda r: (r["budget"] is None, r["budget"] or 0, order.get(r["method"], 9), r.get("mac_fraction", 0)))
    # Paired differences vs calibrated at the same budget: calibrated minus other, per caption.
    for r in rows:
        b = r["budget"]
        ref = f"calibrated@{b:g}" if b is not None else None
        if r["method"] in ("calibrated", "dense-rerun") or ref not in per_caption:
            continue
        diffs = {}
        for m in ("psnr", "iou", "ssim"):
            a, o = per_caption[ref].get(m), per_caption[r["row"]].get(m)
            k = 0 if a is None or o is None else min(len(a), len(o))  # a cut-off run: the captions both rows have
            if k:  # (chunks run in caption order, so both hold captions 0..k-1)
                diffs[m] = {**dict(zip(("mean", "lo", "hi"), bootstrap_ci(a[:k] - o[:k], resamples=resamples, seed=seed))),
                            "n": k}
        r["calibrated_minus_this"] = diffs
    dense = [r for r in records if r.get("kind") == "dense" and r["start"] < n]
    dense_acc = _concat(dense, "acc", n) if dense else None
    out = {
        "n": n,
        "rows": rows,
        "dense": {
            "n": 0 if dense_acc is None else int(len(dense_acc)),
            "seconds": round(sum(d["seconds"] for d in dense), 1),
            "acc": None if dense_acc is None or not len(dense_acc) else dict(
                zip(("mean", "lo", "hi"), bootstrap_ci(dense_acc, resamples=resamples, seed=seed))
            ),
        },
        "unreachable": [{"row": r["row"], "reason": r["reason"]} for r in records if r.get("kind") == "unreachable"],
        # only the last measuring run's (it starts with a versions record): a rerun that completed clears them
        "phase_errors": [{"phase": r["phase"], "error": r["error"]} for r in records[_last_run(records):]
                         if r.get("kind") == "phase_error"],
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
        "psnr_cap_db": PSNR_CAP_DB,
    }
    return out


# --------------------------------------------------------------------------- findings
def _noise(agg: dict[str, Any], m: str) -> float:
    """The metric's noise: what the dense re-run reads against dense (distance from the ideal value)."""
    rerun = next((r for r in agg["rows"] if r["method"] == "dense-rerun"), None)
    ideal = PSNR_CAP_DB if m == "psnr" else (0.0 if m == "latent_err" else 1.0)
    return abs(ideal - rerun[m]["mean"]) if rerun and m in rerun else 0.0


def _mean(row: dict[str, Any], m: str, digits: int) -> str:
    return f"{row[m]['mean']:.{digits}f}" if m in row else "-"


def _fmt_ci(d: dict[str, float] | None, digits: int, scale: float = 1.0) -> str:
    if not d:
        return "-"
    return f"{scale * d['mean']:.{digits}f} [{scale * d['lo']:.{digits}f}, {scale * d['hi']:.{digits}f}]"


def findings(agg: dict[str, Any]) -> list[str]:
    """Sentences computed from the aggregated numbers (nothing hand-written about the outcome)."""
    rows = agg["rows"]
    out: list[str] = []
    by = {r["row"]: r for r in rows}
    rerun = next((r for r in rows if r["method"] == "dense-rerun"), None)
    if rerun:
        out.append(
            f"Noise floor (dense re-run with another batch split vs the dense reference, n={rerun['n']}): "
            f"PSNR {_fmt_ci(rerun.get('psnr'), 2)} dB (cap {PSNR_CAP_DB:g} = identical), object IoU "
            f"{_fmt_ci(rerun.get('iou'), 4)}, SSIM {_fmt_ci(rerun.get('ssim'), 5)}."
        )
    for name in [r["row"] for r in rows if r["method"] == "cat" and r["budget"] == 0.3]:
        r = by[name]
        parts = []
        for m, label in (("iou", "object IoU"), ("psnr", "PSNR"), ("ssim", "SSIM")):
            if m not in r:
                continue
            noise = _noise(agg, m)
            ideal = PSNR_CAP_DB if m == "psnr" else 1.0
            dist = ideal - r[m]["mean"]
            ratio = f"{dist / noise:.0f}x" if noise > NOISE_RESOLUTION[m] else "inf x (the re-run reads no difference)"
            outside = r[m]["hi"] < ideal - noise
            parts.append(f"{label} {_fmt_ci(r[m], 4)} is {dist:.4g} from dense = {ratio} the re-run noise "
                         f"{noise:.2g}; CI half-width {half_width((r[m]['mean'], r[m]['lo'], r[m]['hi'])):.2g}, "
                         + ("the whole interval lies outside the noise band" if outside else "the interval reaches the noise band"))
        out.append(f"Separation, {name} vs dense (n={r['n']}): " + "; ".join(parts) + ".")
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    for b in budgets:
        cal = by.get(f"calibrated@{b:g}")
        if cal is None:
            continue
        others = [r for r in rows if r["budget"] == b and r["method"] not in ("calibrated", "dense-rerun")]
        verdicts = []
        for m, label in (("psnr", "PSNR"), ("iou", "object IoU")):
            lost = [o["row"] for o in others if m in o.get("calibrated_minus_this", {})
                    and o["calibrated_minus_this"][m]["hi"] < 0]
            won = [o["row"] for o in others if m in o.get("calibrated_minus_this", {})
                   and o["calibrated_minus_this"][m]["lo"] > 0]
            tied = [o["row"] for o in others if o["row"] not in lost + won and m in o.get("calibrated_minus_this", {})]
            if not lost + won + tied:
                continue  # metric not measured (no checker on this model) or no other row at this budget
            verdicts.append(
                f"{label}: " + ("best or tied" if not lost else "LOSES to " + ", ".join(
                    f"{o} ({_fmt_ci(by[o]['calibrated_minus_this'][m], 3)})" for o in lost))
                + f" (better than {len(won)}, tied within the interval with {len(tied)})"
            )
        if verdicts:
            out.append(f"Budget {b:g}: calibrated " + "; ".join(verdicts) + ".")
        target = TARGETS_DB.get(b)
        if target is not None and "psnr" in cal:
            gap = cal["psnr"]["mean"] - target
            out.append(f"Target PSNR >= {target:g} dB at {b:g}: calibrated {cal['psnr']['mean']:.2f} dB: "
                       + ("met" if gap >= 0 else f"MISSED by {-gap:.2f} dB") + ".")
        if cal.get("plan") and 0.4 <= b <= 0.75:
            keeps = cal["plan"]["image_keep"]
            pruned = sum(1 for k in keeps if k > 0 and k != -1)
            out.append(f"Calibrated plan at {b:g}: {pruned} token-pruned steps, {keeps.count(0)} reuse steps of {len(keeps)}.")
    for u in agg.get("unreachable", []):
        out.append(f"{u['row']}: no plan at this budget: {u['reason']}")
    for e in agg.get("phase_errors", []):
        out.append(f"Phase {e['phase']!r} FAILED (its rows may be missing or short): {e['error']}")
    full = agg.get("n") or max((r["n"] for r in rows if r["method"] != "dense-rerun"), default=0)
    short = [f"{r['row']} (n={r['n']})" for r in rows if r["method"] != "dense-rerun" and r["n"] < full]
    if short:
        out.append(f"Incomplete run: {len(short)} row(s) have fewer than the {full} captions asked (cut off; a rerun "
                   "of the same command completes them; paired differences use the captions both rows have): "
                   + ", ".join(short) + ".")
    off = [f"{r['row']} ({r['mac_fraction']:.3f})" for r in rows
           if r["budget"] is not None and "mac_fraction" in r and abs(r["mac_fraction"] - r["budget"]) > MAC_TOL]
    out.append("Counted MACs within +-0.01 of the budget for every plan row." if not off
               else "Counted MACs off the budget by more than 0.01: " + ", ".join(off) + ".")
    caches = [r for r in rows if r["budget"] is None and r["method"] != "dense-rerun" and "mac_fraction" in r]
    for c in caches:
        near = [r for r in rows if r["method"] == "calibrated" and "mac_fraction" in r]
        if not near or "psnr" not in c:
            continue
        best = min(near, key=lambda r: abs(r["mac_fraction"] - c["mac_fraction"]))
        out.append(f"{c['row']}: counted MAC fraction {c['mac_fraction']:.3f}, PSNR {_mean(c, 'psnr', 2)} dB, IoU "
                   f"{_mean(c, 'iou', 4)}; nearest calibrated row {best['row']} (MACs {best['mac_fraction']:.3f}): "
                   f"PSNR {_mean(best, 'psnr', 2)} dB, IoU {_mean(best, 'iou', 4)}.")
    return out


# --------------------------------------------------------------------------- rendering
def table(agg: dict[str, Any]) -> str:
    head = ("| row | MAC fraction | PSNR dB [95% CI] | object IoU [95% CI] | SSIM | accuracy % | latent err | "
            "calibrated - this: PSNR dB / IoU | n | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in agg["rows"]:
        d = r.get("calibrated_minus_this", {})
        diff = " / ".join(_fmt_ci(d.get(m), k) for m, k in (("psnr", 2), ("iou", 4))) if d else ""
        mf = r.get("mac_fraction")
        name = r["row"] + (f" (= {r['identical_to']})" if r.get("identical_to") else "")
        lines.append(
            f"| {name} | {'-' if mf is None else f'{mf:.3f}'} | {_fmt_ci(r.get('psnr'), 2)} | {_fmt_ci(r.get('iou'), 4)} | "
            f"{_fmt_ci(r.get('ssim'), 4)} | {_fmt_ci(r.get('acc'), 1, 100)} | {_fmt_ci(r.get('latent_err'), 4)} | {diff} | "
            f"{r['n']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path, title: str) -> Path:
    """PSNR and object IoU against counted MAC fraction, with 95% intervals; caches as single points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    rows = [r for r in agg["rows"] if "mac_fraction" in r and r["method"] != "dense-rerun"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = {"calibrated": "o", "cat": "s", "ras": "D", "interleaved": "v", "random": "x",
               "taylorseer": "P", "magcache": "*", "fbc": "^"}
    for ax, m, label in zip(axes, ("psnr", "iou"), ("PSNR vs dense (dB)", "object mask IoU vs dense")):
        for meth in methods:
            rs = sorted((r for r in rows if r["method"] == meth and m in r), key=lambda r: r["mac_fraction"])
            if not rs:
                continue
            x = [r["mac_fraction"] for r in rs]
            y = [r[m]["mean"] for r in rs]
            err = [[r[m]["mean"] - r[m]["lo"] for r in rs], [r[m]["hi"] - r[m]["mean"] for r in rs]]
            ls = "-" if rs[0]["budget"] is not None else "none"
            ax.errorbar(x, y, yerr=err, marker=markers.get(meth, "o"), linestyle=ls, capsize=3, label=meth)
        ax.set_xlabel("counted transformer MAC fraction of dense")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"{label}: not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def markdown(doc: dict[str, Any]) -> str:
    """The whole report: header (command, versions, wall time, settings), findings, plans, table."""
    agg, st, v = doc["aggregate"], doc["settings"], doc["versions"]
    lines = [
        f"# Quality comparison: {st['model']}",
        "",
        ("Every row against the dense run of the same held-out captions and seeds. Metrics per caption, then means "
         f"with seeded percentile-bootstrap 95% intervals ({agg['bootstrap']['resamples']} resamples): PSNR "
         f"(capped at {agg['psnr_cap_db']:g} dB = identical), per-object mask IoU against the dense image's objects "
         "(checker segmentation, same colour, same cell; added objects count 0), SSIM, checker attribute accuracy, "
         "relative L2 error of the final latents. MAC fraction = transformer MACs counted while running (matmuls, "
         "convolutions, attention) / (steps x one dense step); plan rows are counted on one full eager run."),
        "",
        f"- command: `{doc['command']}`",
        f"- wall time: {doc['wall_time_s'] / 60:.1f} min this invocation; {doc.get('work_seconds', 0) / 60:.1f} min of "
        "measured work in the records (all invocations)",
        (f"- versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, numpy {v['numpy']}, "
         f"tokprune {v['tokprune']}; {v['device']}" + ("" if "threads)" in v["device"] else f", {v['threads']} threads")),
        (f"- sampling: {st['call']}; n={st['n']} held-out captions (dataset split seed {st['split_seed']}), caption i "
         f"seeded {st['seed']}+i, chunks of {st['chunk']}; calibration on {len(st['calib_captions'])} train-split captions"),
        f"- dense reference: accuracy {_fmt_ci(agg['dense'].get('acc'), 1, 100)} %, {agg['dense']['seconds']:.0f} s",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in doc["findings"]],
        "",
        "## Plans (per step: D dense, R reuse, K kept image tokens, /t text tokens kept)",
        "",
    ]
    from tokprune.yardstick.rows import plan_string

    for r in agg["rows"]:
        if r.get("plan"):
            extra = {k: r["info"][k] for k in ("t0", "calib_error", "measured_error", "predicted_error") if k in r.get("info", {})}
            lines.append(f"- {r['row']} ({r['policy']}): `{plan_string(r['plan'])}`" + (f" {extra}" if extra else ""))
        elif r.get("settings") is not None:
            lines.append(f"- {r['row']}: diffusers settings {r['settings']}")
    lines += ["", "## Results", "", "![quality](quality.png)", "", table(agg), ""]
    return "\n".join(lines)

