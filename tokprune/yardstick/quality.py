"""``tokprune-quality``: pruned vs dense image quality at several MAC budgets, per method.

At every budget it samples the same held-out captions on the same seeds with

- ``calibrated``: tokprune's :func:`~tokprune.calibrate.calibrate` schedule (``cat`` policy); the
  error profile is measured ONCE on ``--calib-prompts`` captions of the dataset's *train* split and
  re-optimised for every budget (``profile=``), so calibration never sees the evaluated captions;
- ``cat``: CAT's fixed schedule (dense warm-up, then one keep count) at the same MACs
  (:func:`~tokprune.calibrate.optimize.cat_schedule`), ``cat`` policy;
- ``dynamics`` / ``random``: the *calibrated* schedule's plan, with that selection policy instead,
  so they differ from ``calibrated`` only in which tokens are kept;

and compares each against the dense run: PSNR and SSIM of the final images (in [0, 1]), the
yardstick checker's attribute accuracy (trained ``shapes`` model only; random-weight models measure
speed, never quality) and the achieved MAC fraction (:func:`tokprune.pruning.macs.mac_fraction`).
All ``--n`` captions of a configuration run in one batched pipeline call.

Example::

    tokprune-quality --model shapes --budgets 0.3,0.5 --n 8 --out results/quality
    # writes quality.json, quality.md and quality.png; prints the table last
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokprune.errors import ConfigError, ShapeError, TokpruneError

logger = logging.getLogger(__name__)

PROG = "tokprune-quality"
METHODS: tuple[str, ...] = ("calibrated", "cat", "dynamics", "random")
DEFAULT_BUDGETS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.75)
ROW_KEYS: tuple[str, ...] = ("method", "budget", "mac_fraction", "psnr_db", "ssim", "accuracy", "per_attribute")
NO_SELECT_NOTE = (
    "the calibrated plan has no step with 0 < K < N image tokens (only dense, text-pruned and reuse steps), so "
    "the policy never selects and the run is bit-identical to calibrated: row copied, not rerun"
)
PLAN_NOTE = "dynamics and random run the calibrated schedule's plan (same keep counts per step) with that policy"


# --------------------------------------------------------------------------- image metrics
def _nchw(images: Any) -> torch.Tensor:
    """(N, C, H, W) float64 from (H, W, C) or (N, H, W, C) arrays in [0, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ShapeError(f"images have shape {tuple(x.shape)}; expected (H, W, C) or (N, H, W, C)")
    return x.permute(0, 3, 1, 2)  # (N, C, H, W)


def psnr(a: Any, b: Any, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of (N, H, W, C) (or one (H, W, C)) images; ``inf`` where identical."""
    x, y = _nchw(a), _nchw(b)
    if x.shape != y.shape:
        raise ShapeError(f"psnr: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)  # (N,)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(data_range**2 / mse.numpy())).astype(np.float64)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size), sums to 1


def ssim(
    a: Any, b: Any, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of (N, H, W, C) (or one (H, W, C)) images in [0, ``data_range``].

    Gaussian window ``window`` x ``window``, std ``sigma``, valid positions only, each channel
    separately, then the SSIM map averaged over channels and positions. Identical images give 1.
    """
    x, y = _nchw(a), _nchw(b)
    if x.shape != y.shape:
        raise ShapeError(f"ssim: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    c = x.shape[1]
    if min(x.shape[-2:]) < window:
        raise ShapeError(f"ssim: images are {tuple(x.shape[-2:])}, smaller than the {window}x{window} window")
    w = _gaussian_window(window, sigma).expand(c, 1, window, window)  # (C, 1, k, k), depthwise

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, w, groups=c)  # (N, C, H-k+1, W-k+1)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(dim=1).numpy()


def _mean_psnr(values: np.ndarray) -> float | None:
    """Mean per-image PSNR; None (JSON null) when any image is identical to dense (infinite)."""
    m = float(np.mean(values))
    return m if math.isfinite(m) else None


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Setting:
    """How every configuration is sampled: the same for dense and pruned runs."""

    model: str
    call: dict[str, Any]  # kwargs of every pipeline call (height, width, steps, guidance, T5 length)
    captions: tuple[str, ...]  # held-out captions (dataset split seed 1)
    calib_captions: tuple[str, ...]  # calibration captions (train split)
    seed: int  # image i uses a CPU generator seeded seed + i

    @property
    def steps(self) -> int:
        return int(self.call["num_inference_steps"])


def _generate(pipe: Any, s: Setting, desc: str) -> tuple[np.ndarray, float]:
    """All captions in ONE batched call: ((n, H, W, 3) float32 in [0, 1], seconds)."""
    gens = [torch.Generator("cpu").manual_seed(s.seed + i) for i in range(len(s.captions))]
    pipe.set_progress_bar_config(desc=desc, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = pipe(prompt=list(s.captions), generator=gens, output_type="np", **s.call).images
    return np.asarray(images, dtype=np.float32), time.perf_counter() - t0


def _accuracy_reason(model: str) -> str | None:
    """None when the checker can score this model's images, else why accuracy is skipped."""
    from tokprune.yardstick import SHAPES_DIR

    if model == "shapes" or (Path(model) / "yardstick.json").is_file() or Path(model).resolve() == SHAPES_DIR:
        return None
    return (
        f"--model {model} is not a trained yardstick: the checker reads only the shapes scenes that the trained "
        "'shapes' model draws, and random-weight models measure speed, never quality"
    )


def _score(images: np.ndarray, s: Setting) -> dict[str, Any]:
    from tokprune.yardstick.checker import ATTRIBUTES, score
    from tokprune.yardstick.dataset import parse_caption

    res = score(images, [parse_caption(c) for c in s.captions])
    return {
        "accuracy": res["mean"],
        "per_attribute": {a: res[a] for a in ATTRIBUTES},
        "checker": {k: res[k] for k in ("object", "image", "extra", "n_images", "n_objects")},
    }


def _selects(plan: Any, num_tokens: int) -> bool:
    """Whether any step keeps 0 < K < N image tokens (the only steps where a selection policy acts)."""
    return any(0 < plan.image_k(step, num_tokens) < num_tokens for step in range(plan.num_steps))


def _plan_dict(plan: Any) -> dict[str, Any]:
    return {"image_keep": list(plan.image_keep), "text_keep": None if plan.text_keep is None else list(plan.text_keep)}


def _profile_units(geometry: Any, s: Setting) -> float:
    """Estimated cost of profiling in dense-config units (MACs of the dense call + every probe, per step)."""
    from tokprune.calibrate.profile import IMAGE_FRACTIONS, TEXT_FRACTIONS, default_grid, derive_align
    from tokprune.pruning.macs import dense_macs, step_macs

    g, align = geometry, derive_align(geometry.num_tokens)
    per_step = dense_macs(g) + sum(step_macs(g, k) for k in default_grid(g.num_tokens, IMAGE_FRACTIONS, align))
    per_step += sum(step_macs(g, -1, k) for k in default_grid(g.text_tokens, TEXT_FRACTIONS, align))
    return per_step / dense_macs(g) * len(s.calib_captions) / len(s.captions)


def run_benchmark(
    pipe: Any,
    s: Setting,
    *,
    budgets: Sequence[float],
    methods: Sequence[str],
    progress: bool = True,
    on_row: Any = None,
) -> dict[str, Any]:
    """Dense once, then every (budget, method); returns ``{"dense": row, "rows": [...], "timing": {...}}``.

    ``on_row(partial_result)`` is called after every configuration (used to write JSON as it goes).
    """
    from tqdm.auto import tqdm

    from tokprune import pruning
    from tokprune.calibrate.api import calibrate
    from tokprune.calibrate.optimize import cat_schedule
    from tokprune.calibrate.profile import profile_pipeline
    from tokprune.pruning.geometry import Geometry
    from tokprune.pruning.macs import mac_fraction

    reason = _accuracy_reason(s.model)
    call = s.call
    vsf = int(pipe.vae_scale_factor)
    height = int(call.get("height") or pipe.default_sample_size * vsf)
    width = int(call.get("width") or pipe.default_sample_size * vsf)
    msl = int(call.get("max_sequence_length", 256))
    cfg = float(call["guidance_scale"]) > 1.0
    geometry = Geometry.from_config(
        pipe.transformer.config,
        batch=(2 if cfg else 1) * len(s.captions),
        latent_hw=(height // vsf, width // vsf),
        text_tokens=int(pipe.tokenizer.model_max_length) + msl,
    )
    # Progress in dense-config units (MAC-weighted), so tqdm's ETA is a cost-weighted ETA.
    profile_units = (
        _profile_units(geometry, s) if "calibrated" in methods or {"dynamics", "random"} & set(methods) else 0.0
    )
    total_units = 1.0 + profile_units + len(methods) * sum(budgets)
    bar = tqdm(total=round(total_units, 2), desc="quality", unit="dense-cfg", disable=not progress, dynamic_ncols=True)
    timing: dict[str, Any] = {"estimated_units": round(total_units, 2)}
    result: dict[str, Any] = {"dense": None, "rows": [], "timing": timing, "accuracy_skipped": reason}

    dense_images, secs = _generate(pipe, s, "dense")
    # psnr_db None: dense is the reference, identical to itself (infinite PSNR).
    dense: dict[str, Any] = {
        "method": "dense",
        "budget": 1.0,
        "mac_fraction": 1.0,
        "psnr_db": None,
        "ssim": 1.0,
        "accuracy": None,
        "per_attribute": None,
        "seconds": round(secs, 2),
    }
    if reason is None:
        dense.update(_score(dense_images, s))
    result["dense"] = dense
    timing["dense_s"] = round(secs, 2)
    bar.update(1.0)
    eta = secs * (total_units - 1.0)
    logger.info(
        "dense config (%d images, one batched call) took %.1f s; estimated remaining %.1f min (%.1f dense-config "
        "units: profiling %.2f + %d configs at their MAC fractions)",
        len(s.captions),
        secs,
        eta / 60,
        total_units - 1.0,
        profile_units,
        len(methods) * len(budgets),
    )
    if on_row:
        on_row(result)

    # Exactly as the pipeline is called: steps, guidance, size, T5 length; cat policy, calibration seed.
    same = {
        "steps": s.steps,
        "guidance": float(call["guidance_scale"]),
        "height": height,
        "width": width,
        "policy": "cat",
        "seed": s.seed,
        "max_sequence_length": msl,
    }
    profile = None
    if profile_units:
        t0 = time.perf_counter()
        profile = profile_pipeline(
            pipe, list(s.calib_captions), batch_size=len(s.calib_captions), progress=progress, **same
        )
        timing["profile_s"] = round(time.perf_counter() - t0, 2)
        bar.update(round(profile_units, 2))
        logger.info(
            "profiled %d train captions in %.1f s (estimated %.1f s)",
            len(s.calib_captions),
            timing["profile_s"],
            secs * profile_units,
        )

    for budget in budgets:
        sched = None
        if profile is not None:
            sched = calibrate(
                pipe,
                budget=budget,
                prompts=list(s.calib_captions),
                num_prompts=None,
                model=s.model,
                profile=profile,
                progress=False,
                **same,
            )
        done: dict[str, dict[str, Any]] = {}
        for method in methods:
            if method == "cat":
                plan, policy, source = (cat_schedule(geometry, s.steps, budget), "cat", "cat_schedule")
            else:
                plan, policy, source = (sched.to_plan(), ("cat" if method == "calibrated" else method), "calibrated")
            frac = mac_fraction(geometry, plan)
            if source == "calibrated" and "calibrated" in done and not _selects(plan, geometry.num_tokens):
                # No step keeps 0 < K < N image tokens: the policy is never asked to select, so the run is
                # bit-identical to the calibrated one (same plan, seeds, text selection). Record, don't rerun.
                row = {
                    **done["calibrated"],
                    "method": method,
                    "policy": policy,
                    "seconds": 0.0,
                    "identical_to": "calibrated",
                    "identical_reason": NO_SELECT_NOTE,
                }
                result["rows"].append(row)
                bar.update(round(budget, 2))
                logger.info("%-10s budget %.2f: %s", method, budget, NO_SELECT_NOTE)
                if on_row:
                    on_row(result)
                continue
            pruning.apply(pipe, plan, policy=policy)
            try:
                images, secs = _generate(pipe, s, f"{method}@{budget:g}")
            finally:
                pruning.remove(pipe)
            p, q = psnr(images, dense_images), ssim(images, dense_images)
            row: dict[str, Any] = {
                "method": method,
                "budget": float(budget),
                "mac_fraction": frac,
                "psnr_db": _mean_psnr(p),
                "ssim": float(np.mean(q)),
                "accuracy": None,
                "per_attribute": None,
                "policy": policy,
                "schedule": source,
                "plan": _plan_dict(plan),
                "psnr_db_per_image": [float(v) if math.isfinite(v) else None for v in p],
                "ssim_per_image": [float(v) for v in q],
                "seconds": round(secs, 2),
            }
            if reason is None:
                row.update(_score(images, s))
            result["rows"].append(row)
            done[method] = row
            bar.update(round(budget, 2))
            logger.info(
                "%-10s budget %.2f: MACs %.3f  PSNR %s dB  SSIM %.4f%s  (%.1f s)",
                method,
                budget,
                frac,
                _fmt(row["psnr_db"], 2),
                row["ssim"],
                "" if reason else f"  acc {100 * row['accuracy']:.1f}%",
                secs,
            )
            if on_row:
                on_row(result)
    bar.close()
    return result


# --------------------------------------------------------------------------- reporting
def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(result: dict[str, Any]) -> str:
    """Markdown table: dense first, then rows by budget and method."""
    head = "| method | budget | MAC fraction | PSNR dB | SSIM | accuracy % | position | colour | shape | size | s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in [result["dense"], *result["rows"]]:
        pa = r.get("per_attribute") or {}
        psnr_cell = "inf (ref)" if r["method"] == "dense" else _fmt(r["psnr_db"], 2)
        name = r["method"] + (f" (= {r['identical_to']})" if r.get("identical_to") else "")
        lines.append(
            f"| {name} | {r['budget']:.2f} | {r['mac_fraction']:.3f} | {psnr_cell} | {r['ssim']:.4f} | "
            f"{_pct(r['accuracy'])} | {_pct(pa.get('position'))} | {_pct(pa.get('colour'))} | "
            f"{_pct(pa.get('shape'))} | {_pct(pa.get('size'))} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def findings(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers: calibrated vs CAT, calibrated vs random, budget 0.5 vs dense."""
    rows = result["rows"]
    by = {(r["method"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows})
    dense = result["dense"]
    has_acc = dense.get("accuracy") is not None
    out: list[str] = []
    if has_acc:
        n_obj = dense["checker"]["n_objects"]
        out.append(
            f"Resolution: {dense['checker']['n_images']} images with {n_obj} stated objects, so one attribute of one "
            f"object moves accuracy by {100 / (4 * n_obj):.2f} points; differences of a point or two are within noise."
        )

    def tally(diffs: list[float], tol: float) -> str:
        hi, lo = sum(v > tol for v in diffs), sum(v < -tol for v in diffs)
        return f"higher at {hi}, equal at {len(diffs) - hi - lo}, lower at {lo} of {len(diffs)} budgets"

    def compare(a: str, b: str, label: str) -> None:
        xs = [x for x in budgets if (a, x) in by and (b, x) in by]
        if not xs:
            return
        pa, pb = [by[(a, x)] for x in xs], [by[(b, x)] for x in xs]
        parts = [
            f"MAC fractions differ by at most {max(abs(p['mac_fraction'] - q['mac_fraction']) for p, q in zip(pa, pb)):.3f}"
        ]
        if has_acc:
            d = [100 * (p["accuracy"] - q["accuracy"]) for p, q in zip(pa, pb)]
            parts.append(
                f"accuracy of {a} {tally(d, 1e-9)} ("
                + ", ".join(f"{x:g}: {v:+.1f}" for x, v in zip(xs, d))
                + f" points; mean {np.mean(d):+.1f})"
            )
        dp = [p["psnr_db"] - q["psnr_db"] for p, q in zip(pa, pb) if None not in (p["psnr_db"], q["psnr_db"])]
        if dp:
            parts.append(f"PSNR {tally(dp, 1e-9)} (mean {np.mean(dp):+.2f} dB)")
        ds = [p["ssim"] - q["ssim"] for p, q in zip(pa, pb)]
        parts.append(f"SSIM {tally(ds, 1e-12)} (mean {np.mean(ds):+.4f})")
        copied = [f"{x:g}" for x, q in zip(xs, pb) if q.get("identical_to") == a]
        if copied:
            parts.append(f"identical by construction at budgets {', '.join(copied)} (no step selects image tokens)")
        out.append(f"{label}: " + "; ".join(parts) + ".")

    compare("calibrated", "cat", "Calibrated vs CAT at equal MACs")
    compare("calibrated", "dynamics", "Calibrated (cat policy) vs dynamics policy (same plan)")
    out += _verdicts(by, budgets, has_acc)
    cal = [(x, by[("calibrated", x)]["plan"]["image_keep"]) for x in budgets if ("calibrated", x) in by]
    if cal:
        out.append(
            "Calibrated plans (steps with 0 < K < N image tokens / reuse steps of "
            f"{len(cal[0][1])}): "
            + ", ".join(f"{x:g}: {sum(k > 0 for k in p)}/{p.count(0)}" for x, p in cal)
            + "; the policies differ only on the first kind."
        )
    if has_acc:
        half = by.get(("calibrated", 0.5))
        if half is not None:
            gap = 100 * (dense["accuracy"] - half["accuracy"])
            verdict = "within" if gap <= 2.0 else "NOT within"
            out.append(
                f"Budget 0.5: calibrated accuracy {100 * half['accuracy']:.1f}% vs dense {100 * dense['accuracy']:.1f}% "
                f"(dense minus calibrated = {gap:+.1f} points): {verdict} 2 points of dense, at MAC fraction "
                f"{half['mac_fraction']:.3f}."
            )
    else:
        out.append(f"Accuracy not measured: {result['accuracy_skipped']}.")
    return out


def _verdicts(by: dict, budgets: list[float], has_acc: bool) -> list[str]:
    """The expectations stated with the issue, each marked holds / refuted from the rows."""
    out = []
    xs = [x for x in budgets if ("calibrated", x) in by and ("cat", x) in by]
    if xs:
        metrics = (["accuracy"] if has_acc else []) + ["psnr_db", "ssim"]
        fails = {m: [x for x in xs if (by[("calibrated", x)][m] or 0) < (by[("cat", x)][m] or 0)] for m in metrics}
        text = "; ".join(
            f"{m}: "
            + (
                "holds"
                if not f
                else "refuted at "
                + ", ".join(f"{x:g} (CAT {by[('cat', x)][m]:.4g} vs {by[('calibrated', x)][m]:.4g})" for x in f)
            )
            for m, f in fails.items()
        )
        out.append(f"Expectation 'calibrated >= CAT at every budget': {text}.")
    xs = [x for x in budgets if ("calibrated", x) in by and ("random", x) in by]
    if xs:
        same = [x for x in xs if by[("random", x)].get("identical_to") == "calibrated"]
        diff = [x for x in xs if x not in same]
        gains = [(x, by[("calibrated", x)], by[("random", x)]) for x in diff]
        detail = ", ".join(
            f"{x:g}: "
            + (f"{100 * (c['accuracy'] - r['accuracy']):+.1f} points, " if has_acc else "")
            + f"{(c['psnr_db'] or 0) - (r['psnr_db'] or 0):+.2f} dB"
            for x, c, r in gains
        )
        clear = (
            bool(gains)
            and not same
            and all(
                (c["psnr_db"] or 0) > (r["psnr_db"] or 0) and (not has_acc or c["accuracy"] >= r["accuracy"])
                for _, c, r in gains
            )
        )
        out.append(
            "Expectation 'calibrated clearly better than random': "
            + ("holds" if clear else "not shown")
            + ": "
            + (
                f"identical by construction at {', '.join(f'{x:g}' for x in same)} (the plan never selects image "
                "tokens, so the policy is moot); "
                if same
                else ""
            )
            + (f"calibrated minus random at {detail}." if gains else "no budget where they differ.")
        )
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels against MAC fraction (accuracy, PSNR), one line per method, dense as reference (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_psnr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    dense = result["dense"]
    styles = {"calibrated": ("o", "-"), "cat": ("s", "--"), "dynamics": ("^", "-."), "random": ("x", ":")}
    for m in methods:
        mk, ls = styles.get(m, ("o", "-"))
        rs = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["mac_fraction"])
        x = [r["mac_fraction"] for r in rs]
        if dense.get("accuracy") is not None:
            ax_acc.plot(x, [100 * r["accuracy"] for r in rs], marker=mk, linestyle=ls, label=m)
        ax_psnr.plot(
            x, [np.nan if r["psnr_db"] is None else r["psnr_db"] for r in rs], marker=mk, linestyle=ls, label=m
        )
    if dense.get("accuracy") is not None:
        ax_acc.axhline(
            100 * dense["accuracy"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"dense {100 * dense['accuracy']:.1f}%",
        )
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(
            0.5,
            0.5,
            "accuracy not measured\n(not a trained yardstick)",
            ha="center",
            va="center",
            transform=ax_acc.transAxes,
        )
    ax_acc.set_xlabel("MAC fraction of dense")
    ax_acc.set_ylabel("attribute accuracy (%)")
    ax_acc.set_title("checker accuracy vs MACs")
    ax_psnr.set_xlabel("MAC fraction of dense")
    ax_psnr.set_ylabel("PSNR vs dense (dB)")
    ax_psnr.set_title("PSNR vs dense (dense = inf, the reference)")
    ax_psnr.legend(fontsize=8)
    for ax in (ax_acc, ax_psnr):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", useOffset=False)
    fig.suptitle(f"{result['model']}: pruned vs dense, n={result['settings']['n']} held-out captions", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def markdown(result: dict[str, Any]) -> str:
    st = result["settings"]
    v = result["versions"]
    lines = [
        f"# Quality benchmark: {result['model']}",
        "",
        (
            "Pruned vs dense on the same held-out captions and seeds: PSNR / SSIM of the final images (in [0, 1]; SSIM "
            "gaussian window 11, sigma 1.5), the yardstick checker's attribute accuracy, and the achieved MAC fraction."
        ),
        "",
        f"- command: `{result['command']}`",
        f"- wall time: {result['wall_time_s'] / 60:.1f} min ({result['wall_time_s']:.0f} s)",
        (
            f"- versions: python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, numpy {v['numpy']}, "
            f"tokprune {v['tokprune']}; {v['device']}, {v['threads']} threads"
        ),
        (
            f"- sampling: {st['call']}; n={st['n']} held-out captions (split seed {st['split_seed']}), image i seeded "
            f"{st['seed']}+i, all n in one batched call"
        ),
        (
            f"- calibration: profile measured once on {st['calib_prompts']} train-split captions, re-optimised per budget "
            "(`calibrate(..., profile=...)`, cat policy, default 4 buckets)"
        ),
        (
            "- CAT: `cat_schedule` (dense warm-up of round(8/28 x steps) steps, fewer if the budget needs it, then one "
            "fixed K closest to the budget's MACs; text never pruned), cat policy"
        ),
        f"- note: {PLAN_NOTE}",
    ]
    copied = [f"{r['method']}@{r['budget']:g}" for r in result["rows"] if r.get("identical_to")]
    if copied:
        lines.append(f"- copied rows ({', '.join(copied)}): {NO_SELECT_NOTE}")
    if result.get("accuracy_skipped"):
        lines.append(f"- accuracy skipped: {result['accuracy_skipped']}")
    t = result.get("timing", {})
    lines.append(
        f"- time: dense config {t.get('dense_s', 0):.0f} s, profiling {t.get('profile_s', 0):.0f} s; per row in the s column"
    )
    lines += ["", "## Findings", ""] + [f"- {f}" for f in result["findings"]]
    lines += ["", "## Plans (per step: D dense, R reuse, K kept image tokens, /t text tokens kept)", ""]
    lines += [
        f"- {r['method']}@{r['budget']:g}: `{_plan_str(r['plan'])}`"
        for r in result["rows"]
        if r["method"] in ("calibrated", "cat")
    ]
    lines += ["", "## Results", "", "![quality](quality.png)", "", table(result), ""]
    return "\n".join(lines)


def _plan_str(plan: dict[str, Any]) -> str:
    """Run-length string of a plan dict, e.g. ``D x8 | 384 x20`` or ``D x5 | 512/t40 x10 | R x13``."""
    text = plan["text_keep"] or [-1] * len(plan["image_keep"])
    cells = [
        ("D" if k == -1 else "R" if k == 0 else str(k)) + ("" if t == -1 or k == 0 else f"/t{t}")
        for k, t in zip(plan["image_keep"], text)
    ]
    runs: list[list[Any]] = []
    for c in cells:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return " | ".join(f"{c} x{n}" for c, n in runs)


def _versions() -> dict[str, Any]:
    import diffusers

    import tokprune

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "tokprune": tokprune.__version__,
        "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
    }


# --------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--budgets {text!r}: {e}; expected comma-separated fractions, e.g. 0.3,0.5") from e
    if not vals or any(not 0.0 < b < 1.0 for b in vals):
        raise ConfigError(f"--budgets {text!r}; expected fractions of dense MACs in (0, 1), e.g. 0.3,0.5")
    return vals


def _methods(text: str) -> tuple[str, ...]:
    vals = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [m for m in vals if m not in METHODS]
    if not vals or bad:
        raise ConfigError(
            f"--methods {text!r}: unknown {bad}; expected a comma-separated subset of {','.join(METHODS)}"
        )
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--model", default="shapes", help="model (default: shapes, the trained yardstick)")
    p.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
        help="MAC budgets, comma-separated (default: 0.3,0.4,0.5,0.6,0.75)",
    )
    # n=8: the default run takes ~25 min on a quiet 2-core CPU (about twice that with another job on the cores).
    p.add_argument(
        "--n", type=int, default=8, help="held-out captions per configuration, one batched call (default: 8)"
    )
    p.add_argument("--calib-prompts", type=int, default=4, help="train-split captions to profile on (default: 4)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)} (default: all)")
    p.add_argument(
        "--out", type=Path, default=Path("results/quality"), help="output directory (default: results/quality)"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's, else 256)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-quality``. Returns 0, or 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    try:
        return _run(args, argv)
    except TokpruneError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2


def _invocation() -> list[str]:
    """How this process was started: ``python -m tokprune.yardstick.quality`` or the console script."""
    if Path(sys.argv[0]).name == "quality.py":
        return ["python", "-m", "tokprune.yardstick.quality"]
    return [PROG]


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from tokprune.models import call_defaults, load_pipeline
    from tokprune.yardstick.dataset import EVAL_SEED, TRAIN_SEED, sample_spec

    t_start = time.perf_counter()
    budgets, methods = _floats(args.budgets), _methods(args.methods)
    if args.n < 1 or args.calib_prompts < 1:
        raise ConfigError(f"--n {args.n} / --calib-prompts {args.calib_prompts}; expected >= 1 each")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    call = {"guidance_scale": 7.0, "num_inference_steps": 28, **call_defaults(pipe)}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.max_sequence_length is not None:
        call["max_sequence_length"] = args.max_sequence_length
    s = Setting(
        model=args.model,
        call=call,
        captions=tuple(sample_spec(i, EVAL_SEED).caption for i in range(args.n)),
        calib_captions=tuple(sample_spec(i, TRAIN_SEED).caption for i in range(args.calib_prompts)),
        seed=args.seed,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "command": shlex.join([*_invocation(), *argv]),
        "versions": _versions(),
        "settings": {
            "call": call,
            "n": args.n,
            "calib_prompts": args.calib_prompts,
            "split_seed": EVAL_SEED,
            "calib_split_seed": TRAIN_SEED,
            "seed": args.seed,
            "budgets": list(budgets),
            "methods": list(methods),
            "captions": list(s.captions),
            "calib_captions": list(s.calib_captions),
        },
        "notes": [PLAN_NOTE, "psnr_db null = identical to dense (infinite)", "accuracy = mean of the four attributes"],
    }

    def save(partial: dict[str, Any]) -> None:
        doc = {**meta, **partial, "wall_time_s": round(time.perf_counter() - t_start, 1)}
        (out / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")

    result = run_benchmark(pipe, s, budgets=budgets, methods=methods, progress=not args.quiet, on_row=save)
    sys.stdout.write(report({**meta, **result, "wall_time_s": round(time.perf_counter() - t_start, 1)}, out))
    return 0


def report(result: dict[str, Any], out: str | Path) -> str:
    """(Re)compute the findings, write quality.json / .png / .md into ``out``; returns the text to print.

    Works on a loaded quality.json too: ``report(json.load(open(p)), Path(p).parent)``.
    """
    out = Path(out)
    result["findings"] = findings(result)
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "quality.png")
    (out / "quality.md").write_text(markdown(result))
    return (
        f"\nwrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}\n"
        f"command: {result['command']}\nwall time: {result['wall_time_s'] / 60:.1f} min\n\n"
        + "\n".join(f"- {f}" for f in result["findings"])
        + "\n\n"
        + table(result)
        + "\n"
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
