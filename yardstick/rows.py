"""The rows of the comparison: which plan or cache each method runs, at which budget.

Plan rows (one per method and budget, all at the budget's transformer MACs):

- ``calibrated``: :func:`tokprune.calibrate.calibrate` with its defaults (its own calibration prompts,
  the model's train captions), the comparison's call settings;
- ``cat``: CAT's fixed schedule; its warm-up t0 is chosen on the calibration prompts (lowest final
  latent error vs dense) from {4, 6, 8, 10} scaled to the step count;
- ``ras``: RAS-style (dense warm-up, periodic dense refresh, one fixed keep ratio);
- ``interleaved``: dense warm-up, then dense / reuse alternating;
- ``random``: the calibrated plan with the random selection policy.

Cache rows (diffusers' own caches, at several settings): placed on the MAC axis by the MACs that
actually ran (:mod:`tokprune.yardstick.counting`), not matched to a budget.

Example::

    from tokprune.yardstick.rows import DEFAULT_CACHES, cache_rows
    rows = cache_rows(DEFAULT_CACHES, mag_ratios=[1.0] * 28)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_METHODS",
    "DEFAULT_CACHES",
    "PLAN_METHODS",
    "Row",
    "cache_rows",
    "cat_t0_candidates",
    "parse_caches",
    "plan_dict",
    "plan_from_dict",
    "plan_rows",
    "plan_string",
]

PLAN_METHODS: tuple[str, ...] = ("calibrated", "cat", "ras", "interleaved", "random")
CACHE_METHODS: tuple[str, ...] = ("taylorseer", "magcache", "fbc")
#: Cache settings run by default: kind:key=value[;key=value] (see :func:`parse_caches`).
DEFAULT_CACHES: tuple[str, ...] = (
    "taylorseer:use_lite_mode=true;cache_interval=2",
    "taylorseer:use_lite_mode=true;cache_interval=4",
    "taylorseer:cache_interval=3",
    "magcache:threshold=0.06",
    "magcache:threshold=0.24",
    "fbc:threshold=0.1",
    "fbc:threshold=0.3",
)
CAT_T0_AT_28: tuple[int, ...] = (4, 6, 8, 10)
INTERLEAVE_PERIODS: tuple[int, ...] = (2, 3, 4, 5, 6)  # the one landing closest to the budget is used


@dataclass(frozen=True)
class Row:
    """One configuration of the comparison."""

    name: str  # e.g. "cat@0.3", "fbc(threshold=0.1)"
    method: str
    budget: float | None = None  # plan rows only
    plan: dict[str, Any] | None = None  # {"image_keep": [...], "text_keep": [...] | None}
    policy: str | None = None
    cache: Any = None  # CacheSpec for cache rows
    info: dict[str, Any] = field(default_factory=dict)  # how the plan was chosen

    @property
    def is_cache(self) -> bool:
        return self.cache is not None


# --------------------------------------------------------------------------- plans
def plan_dict(plan: Any) -> dict[str, Any]:
    return {"image_keep": list(plan.image_keep), "text_keep": None if plan.text_keep is None else list(plan.text_keep)}


def plan_from_dict(d: dict[str, Any]) -> Any:
    from tokprune.pruning.plan import PrunePlan

    return PrunePlan(tuple(d["image_keep"]), None if d.get("text_keep") is None else tuple(d["text_keep"]))


def plan_string(plan: dict[str, Any]) -> str:
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


def selects_tokens(plan: dict[str, Any], num_tokens: int) -> bool:
    """Whether any step keeps 0 < K < N image tokens (the only steps where a selection policy acts)."""
    return any(0 < k < num_tokens for k in plan["image_keep"])


def cat_t0_candidates(steps: int) -> list[int]:
    """CAT warm-ups {4, 6, 8, 10} of 28 steps, scaled to ``steps`` (distinct, in [1, steps - 1])."""
    return sorted({min(steps - 1, max(1, round(t * steps / 28))) for t in CAT_T0_AT_28})


def _calibrate(pipe: Any, budget: float, *, call: Any, seed: int, checkpoint_dir: Any, model: str) -> Any:
    """tokprune's calibration as a user gets it (its own default prompts: the model's train captions), with
    the comparison's call settings; only keyword arguments this version of ``calibrate`` accepts are passed."""
    from tokprune.calibrate.api import calibrate

    want = dict(
        budget=budget,
        steps=call.steps,
        height=call.height,
        width=call.width,
        guidance=call.guidance,
        max_sequence_length=call.max_sequence_length,
        seed=seed,
        model=model,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        progress=False,
    )
    params = inspect.signature(calibrate).parameters
    return calibrate(pipe, **{k: v for k, v in want.items() if k in params})


def plan_rows(
    pipe: Any,
    *,
    budgets: Sequence[float],
    methods: Sequence[str],
    call: Any,
    calib_runs: Any,
    seed: int,
    model: str,
    store: Any,
    checkpoint_dir: Any = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every plan row (method x budget), each plan computed once and kept in ``store`` (resumable)."""
    from tokprune.calibrate import baselines
    from tokprune.yardstick.runs import geometry_of

    g = geometry_of(pipe, call, 1)
    n = g.num_tokens
    rows: list[Row] = []
    note = on_progress or (lambda _msg: None)
    for b in budgets:
        for method in methods:
            name = f"{method}@{b:g}"
            rec = store.find("plan", row=name) or store.find("unreachable", row=name)
            if rec is None:
                note(f"planning {name}")
                try:
                    plan, policy, info = _make_plan(
                        method, b, pipe=pipe, g=g, call=call, calib_runs=calib_runs,
                        seed=seed, model=model, store=store, checkpoint_dir=checkpoint_dir, baselines=baselines,
                    )
                except ConfigError as e:  # this structure cannot spend this budget: a finding, not a crash
                    rec = {"kind": "unreachable", "row": name, "method": method, "budget": b, "reason": str(e)}
                    store.append(rec)
                    logger.warning("%s: no plan: %s", name, e)
                    continue
                rec = {"kind": "plan", "row": name, "method": method, "budget": b, "plan": plan_dict(plan),
                       "policy": policy, "info": info}
                store.append(rec)
            if rec["kind"] == "unreachable":
                continue
            info = dict(rec["info"])
            if method == "random" and not selects_tokens(rec["plan"], n):
                info["identical_to"] = f"calibrated@{b:g}"
            rows.append(Row(name, method, b, rec["plan"], rec["policy"], None, info))
    return rows


def _make_plan(method: str, b: float, *, pipe: Any, g: Any, call: Any, calib_runs: Any,
               seed: int, model: str, store: Any, checkpoint_dir: Any, baselines: Any) -> tuple[Any, str, dict]:
    steps = call.steps
    if method in ("calibrated", "random"):
        cal = store.find("plan", row=f"calibrated@{b:g}")
        if cal is not None:
            return plan_from_dict(cal["plan"]), ("cat" if method == "calibrated" else "random"), {"source": "calibrate"}
        sched = _calibrate(pipe, b, call=call, seed=seed,
                           checkpoint_dir=None if checkpoint_dir is None else f"{checkpoint_dir}/b{b:g}", model=model)
        info: dict[str, Any] = {"source": "calibrate"}
        for key in ("predicted_error", "measured_error", "heldout_error", "mac_fraction"):
            v = getattr(sched, key, None)
            if isinstance(v, (int, float)):
                info[key] = float(v)
        if method == "calibrated":
            return sched.to_plan(), "cat", info
        store.append({"kind": "plan", "row": f"calibrated@{b:g}", "method": "calibrated", "budget": b,
                      "plan": plan_dict(sched.to_plan()), "policy": "cat", "info": info})
        return sched.to_plan(), "random", info
    if method == "cat":
        errors = {}
        best = None
        for t0 in cat_t0_candidates(steps):
            try:
                plan = baselines.cat_schedule(g, steps, b, t0=t0)
            except ConfigError as e:
                errors[str(t0)] = f"unreachable: {e}"
                continue
            if plan.image_keep[:t0] != (-1,) * t0:  # warm-up shrank to fit the budget: same as a smaller t0
                errors[str(t0)] = "warm-up shrank to fit the budget"
                continue
            err = float(calib_runs.error(plan, "cat"))
            errors[str(t0)] = err
            logger.info("cat@%g: t0=%d gives calibration error %.4f", b, t0, err)
            if best is None or err < best[0]:
                best = (err, t0, plan)
        if best is None:
            plan = baselines.cat_schedule(g, steps, b)
            return plan, "cat", {"source": "cat_schedule", "t0": None, "t0_errors": errors}
        return best[2], "cat", {"source": "cat_schedule", "t0": best[1], "t0_errors": errors,
                                "calib_error": best[0]}
    if method == "ras":
        return baselines.ras_schedule(g, steps, b), "cat", {"source": "ras_schedule"}
    if method == "interleaved":
        # Period 2 (dense, reuse) reaches only budgets >= ~0.5; below, one dense step per longer period.
        # The period whose plan lands closest to the budget is used (ties: the shorter period).
        from tokprune.pruning.macs import mac_fraction

        reasons, found = [], []
        for period in INTERLEAVE_PERIODS:
            try:
                plan = baselines.interleaved_schedule(g, steps, b, period=period)
            except ConfigError as e:
                reasons.append(f"period {period}: {e}")
                continue
            found.append((abs(mac_fraction(g, plan) - b), period, plan))
        if not found:
            raise ConfigError(f"interleaved cannot reach budget {b:g} with periods {INTERLEAVE_PERIODS}: {reasons[-1]}")
        _, period, plan = min(found, key=lambda x: (x[0], x[1]))
        return plan, "cat", {"source": "interleaved_schedule", "period": period}
    raise ConfigError(f"method {method!r}; expected one of {', '.join(PLAN_METHODS)}")


# --------------------------------------------------------------------------- caches
def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError as e:
        raise ConfigError(f"--caches value {text!r}; expected a number or true/false") from e


def parse_caches(specs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``["fbc:threshold=0.1", "taylorseer:use_lite_mode=true;cache_interval=2"]`` -> [(kind, settings)]."""
    out = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        kind = kind.strip()
        if kind not in CACHE_METHODS:
            raise ConfigError(f"--caches entry {spec!r}: unknown cache {kind!r}; expected one of {', '.join(CACHE_METHODS)}")
        settings = {}
        for kv in filter(None, (x.strip() for x in rest.split(";"))):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ConfigError(f"--caches entry {spec!r}: {kv!r} is not key=value, e.g. fbc:threshold=0.1")
            settings[k.strip()] = _value(v)
        out.append((kind, settings))
    return out


def cache_rows(specs: Sequence[str], *, mag_ratios: Sequence[float] | None) -> list[Row]:
    """One row per cache setting; MagCache gets the model's measured ``mag_ratios``."""
    from tokprune.families.sd3.caches import CacheSpec

    rows = []
    for kind, settings in parse_caches(specs):
        shown = CacheSpec(kind, settings)
        if kind == "magcache":
            if mag_ratios is None:
                raise ConfigError("magcache rows need mag_ratios measured on the calibration prompts")
            spec = CacheSpec(kind, {**settings, "mag_ratios": list(mag_ratios)})
        else:
            spec = shown
        rows.append(Row(shown.name, kind, None, None, None, spec, {"settings": settings}))
    return rows
