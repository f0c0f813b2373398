"""``calibrate(pipe, budget=..., steps=...) -> Schedule``: search on measured whole runs, validate, freeze.

Calibration runs the model on a few prompts, measures complete sampling runs of candidate
schedules against the dense run (final latents), searches the schedule structure that loses the
least at the budget (:mod:`tokprune.calibrate.search`), validates the pick on held-out prompts and
freezes it into static-shape buckets. Measurements are checkpointed (``checkpoint_dir``): an
interrupted calibration resumes where it stopped.

Cost model (what one calibration runs), counted in dense prompt-steps (one prompt through one dense
transformer step, both CFG halves; a pruned step counts its MAC fraction, a reused step nothing):
one dense run of the P calibration prompts (``steps * P``), plus each measured candidate's steps
after its longest prefix already run (a dense warm-up is paid once), plus the held-out check (a
dense and a pruned run of the held-out prompts). It is machine-independent and exact
(:meth:`Rollouts.planned_units`): the progress bar's total is the work done plus this round's plans
counted exactly, plus the measurements later rounds may still make at this round's mean cost, plus
the held-out check; it is re-set before every round, so it ends at the work actually done.
``Schedule.stats["cost"]`` records the measured runs; the log line ``calibration cost`` the calls,
the prompt-steps and the first forecast.

Example::

    from tokprune.models import load_pipeline
    from tokprune.calibrate import calibrate

    pipe = load_pipeline("sd3-tiny")
    sched = calibrate(pipe, budget=0.5, steps=28, model="sd3-tiny")
    sched.save("schedule.json")
    sched.mac_fraction   # within 0.02 of 0.5
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Sequence

from tokprune.calibrate.baselines import TOLERANCE, derive_align
from tokprune.calibrate.prompts import load_prompts, split_prompts
from tokprune.calibrate.schedule import REUSE, Bucket, Schedule
from tokprune.calibrate.search import describe, search
from tokprune.errors import ConfigError
from tokprune.hashing import json_sha256
from tokprune.pruning.geometry import REUSE_MODES, Geometry
from tokprune.pruning.macs import dense_macs, mac_fraction, step_macs
from tokprune.pruning.family import family_for
from tokprune.pruning.plan import PrunePlan

logger = logging.getLogger(__name__)

__all__ = ["BASELINES", "baseline_schedule", "cache_plan", "calibrate", "check_inputs"]


def check_inputs(
    pipe: Any,
    *,
    budget: float,
    steps: int,
    height: int | None,
    width: int | None,
    max_buckets: int,
    policy: str | None,
    max_sequence_length: int | None,
    reuse: str,
) -> tuple[int, int, Geometry]:
    """Validate everything cheap before any model call. Returns (height, width, geometry at batch 1).

    ``None`` for height / width / max_sequence_length means the model's call defaults, else the
    pipeline's (:meth:`~tokprune.pruning.family.ModelFamily.settings` resolves them once).
    """
    from tokprune.pruning.policies import make_policy

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"--budget {budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--steps {steps!r}; expected an int >= 2 (step 0 always runs dense)")
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ConfigError(f"--max-buckets {max_buckets!r}; expected an int >= 1 (the dense bucket takes one)")
    if reuse not in REUSE_MODES:
        raise ConfigError(f"reuse={reuse!r}; expected one of {REUSE_MODES}")
    if policy is not None:  # None: the model family's default
        make_policy(policy)  # unknown name -> ConfigError listing the choices
    if budget < 1.0 / steps - TOLERANCE:
        raise ConfigError(
            f"--budget {budget:g} is below what {steps} steps can reach: step 0 always runs dense, i.e. at least "
            f"{1 / steps:.3f} of dense MACs; raise --budget or --steps"
        )
    family = family_for(pipe)
    settings = family.settings(pipe, height=height, width=width, steps=steps, max_sequence_length=max_sequence_length)
    geometry = settings.geometry(family.denoiser(pipe), batch=1)
    return settings.height, settings.width, geometry


def calibrate(
    pipe: Any,
    *,
    budget: float,
    steps: int = 28,
    prompts: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    max_buckets: int = 4,
    policy: str | None = None,
    num_prompts: int | None = 4,
    holdout_prompts: int = 2,
    seed: int = 0,
    batch_size: int = 4,
    max_sequence_length: int | None = None,
    prune_text: bool = True,
    reuse: str = "noise",
    model: str | None = None,
    allow_reuse: bool = True,
    max_rollouts: int = 16,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Schedule:
    """Calibrate a keep schedule for ``pipe`` under a MAC ``budget`` and freeze it into buckets.

    Args that matter:
        pipe: a ``StableDiffusion3Pipeline`` (e.g. ``tokprune.models.load_pipeline("sd3-tiny")``); its
            scheduler is used as configured. It is not modified.
        budget: fraction of a dense run's transformer MACs, in (0, 1], counting everything that runs
            (the text-importance probe included); 1.0 gives the all-dense schedule.
        steps, height, width, guidance, max_sequence_length: exactly as the pipeline will be called later
            (None: the model's call defaults from ``tokprune.models.call_defaults``, else the pipeline's
            default size, guidance 7.0, T5 length 256).
        max_buckets: static shapes allowed, the dense one included (recommended 3-4).
        checkpoint_dir: where measured runs are checkpointed; a re-run with the same directory reuses them
            and yields the same schedule (None: nothing is written).
    Args to tinker with:
        prompts: calibration prompts (default: the model's own set where it has one, e.g. the ``shapes``
            yardstick's train captions, else the ~80 shipped ones); ``num_prompts`` of them, evenly spread,
            are measured and ``holdout_prompts`` others validate the pick.
        max_rollouts: measured candidate schedules at most (9 seeds, then measured moves; 16 by default).
        policy: selection policy the runtime will use (``"cat"``, ``"dynamics"``, ``"random"``; None: the
            model family's default, ``cat``, ``dynamics`` for U-Nets).
        prune_text: let the search prune text tokens too. allow_reuse: let it skip whole steps (K = 0).
        batch_size: prompts per transformer call while measuring (each call carries 2x that under CFG).
        model: the source string recorded in the schedule (what ``--model`` was).

    Returns a :class:`Schedule` with ``mac_fraction`` within 0.02 of ``budget`` and at most
    ``max_buckets`` buckets; ``stats`` records the candidates, the predicted (calibration prompts) and
    measured (held-out prompts) error and the cost. Raises :class:`~tokprune.errors.ConfigError` /
    ``ShapeError`` for bad inputs, before any model call.
    """
    from tokprune.calibrate.checkpoint import RolloutStore
    from tokprune.models import fingerprint

    family = family_for(pipe)
    policy = family.default_policy if policy is None else policy
    height, width, geometry = check_inputs(
        pipe, budget=budget, steps=steps, height=height, width=width, max_buckets=max_buckets, policy=policy,
        max_sequence_length=max_sequence_length, reuse=reuse,
    )
    settings = family_for(pipe).settings(
        pipe, height=height, width=width, steps=steps, guidance=guidance, max_sequence_length=max_sequence_length
    )
    guidance, max_sequence_length = settings.guidance, settings.max_sequence_length
    if isinstance(max_rollouts, bool) or not isinstance(max_rollouts, int) or max_rollouts < 1:
        raise ConfigError(f"--max-rollouts {max_rollouts!r}; expected an int >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}; expected an int >= 1")
    budget = float(budget)
    cfg = guidance > 1.0
    geometry = geometry.with_batch(2 if cfg else 1)  # one prompt per call; ratios do not depend on batch
    from tokprune.models import calibration_prompts

    model_prompts = calibration_prompts(pipe) if prompts is None else None
    source = "user" if prompts is not None else "model" if model_prompts else "built-in"
    if prompts is None:
        prompts = model_prompts or load_prompts()
    all_prompts = [p.strip() for p in prompts if p and p.strip()]
    if not all_prompts:
        raise ConfigError("no calibration prompts given (all empty); pass --prompts FILE with one prompt per line")
    calib, held = split_prompts(all_prompts, num_prompts, holdout_prompts)
    align = derive_align(geometry.num_tokens)
    stats: dict[str, Any] = {
        "method": "measured-rollout-search",
        "objective": "mean relative L2 error of the final latent vs the dense run, whole sampling runs",
        "tolerance": TOLERANCE,
        "calibration": {
            "prompt_source": source, "num_prompts": len(calib), "holdout_prompts": len(held), "seed": seed,
            "batch_size": batch_size, "max_sequence_length": max_sequence_length, "prune_text": bool(prune_text),
            "allow_reuse": bool(allow_reuse), "max_rollouts": max_rollouts,
        },
    }
    if budget >= 1.0:
        logger.info("budget 1.0: all-dense schedule, nothing to measure")
        plan = PrunePlan.dense(steps)
    else:
        identity = {
            "fingerprint": fingerprint(family_for(pipe).denoiser(pipe)), "steps": steps, "guidance": guidance, "height": height,
            "width": width, "max_sequence_length": max_sequence_length, "seed": seed, "reuse": reuse,
            "batch_size": batch_size, "scheduler": dict(pipe.scheduler.config),
            # Measurements are per prompt: another prompt set (or split) must not reuse them.
            "prompts": json_sha256({"calibration": list(calib), "holdout": list(held)}),
        }
        store = RolloutStore(checkpoint_dir, identity)
        meter = _Meter(pipe, store, steps=steps, guidance=guidance, height=height, width=width,
                       max_sequence_length=max_sequence_length, seed=seed, reuse=reuse, policy=policy,
                       batch_size=batch_size)
        t0 = time.perf_counter()
        with meter.progress(progress):
            result = search(
                lambda p: meter.error("calib", calib, p), geometry, steps, budget, align=align,
                max_buckets=max_buckets, reuse=reuse, allow_reuse=allow_reuse, prune_text=prune_text,
                max_rollouts=max_rollouts, step_cache=family.step_caching,
                on_round=lambda plans, further, best: meter.forecast(calib, held, plans, further, best),
            )
            plan = result.best.plan
            meter.forecast(calib, held, [], 0, plan)
            holdout = meter.validate(held, plan) if held else None
        stats["search"] = result.to_stats()
        stats["predicted_error"] = result.best.error
        stats["estimated_error"] = result.best.error  # measured on the calibration prompts
        cat = min((c for c in result.candidates if c.origin.startswith("seed:cat-t0=")), key=lambda c: c.error, default=None)
        if cat is not None:  # CAT's fixed schedule at the same budget, the best of its warm-ups, measured
            stats["cat_reference"] = {
                "origin": cat.origin, "image_keep": [cat.plan.image_k(s, geometry.num_tokens) for s in range(steps)],
                "mac_fraction": cat.mac_fraction, "error": cat.error,
            }
        stats["holdout"] = holdout
        # Deterministic (a resumed run writes the same file): what was measured, not how long it took.
        stats["cost"] = {"measured_runs": result.rollouts, "holdout_runs": 1 if held else 0,
                         "prompts_per_call": min(batch_size, len(calib))}
        logger.info(
            "calibration cost: %d transformer calls (%.1f dense prompt-steps; forecast at the start %.1f) in %.1f s; "
            "%d measured runs reused from the checkpoint", meter.calls, meter.units,
            meter.forecasts[0] if meter.forecasts else 0.0, time.perf_counter() - t0, store.reused,
        )
        if store.reused:
            logger.info("calibration resumed: %d measured runs reused from %s", store.reused, checkpoint_dir)
        logger.info("calibration picked %s: %s (error %.4g on calibration prompts%s)", result.best.structure.key,
                    describe(plan), result.best.error,
                    "" if holdout is None else f", {holdout['error']:.4g} held-out, {holdout['psnr_db']:.1f} dB")
    return _freeze(pipe, plan, geometry, stats, model=model, height=height, width=width, steps=steps,
                   guidance=guidance, budget=budget, policy=policy, reuse=reuse, align=align)


class _Meter:
    """Measures plans on prompt sets through :class:`~tokprune.calibrate.rollout.Rollouts` (chunks of
    ``batch_size`` prompts), behind the checkpoint store; counts the work done."""

    def __init__(self, pipe: Any, store: Any, *, batch_size: int, policy: str, **settings: Any) -> None:
        self.pipe, self.store, self.batch_size, self.policy, self.settings = pipe, store, batch_size, policy, settings
        self._rollouts: dict[tuple[str, int], Any] = {}
        self.calls, self.units = 0, 0.0
        self.forecasts: list[float] = []  # every total forecast() set, in dense prompt-steps
        self._bar = None

    @contextlib.contextmanager
    def progress(self, enabled: bool):
        """The progress bar, in dense prompt-steps; :meth:`forecast` sets and re-sets its total."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=1, desc="calibrating", unit="step", disable=not enabled,
                         bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} prompt-steps [{elapsed}<{remaining}]")
        try:
            yield
        finally:
            self._bar.total = max(self._bar.n, 1)
            self._bar.refresh()
            self._bar.close()
            self._bar = None

    def planned(self, group: str, prompts: Sequence[str], plans: Sequence[PrunePlan]) -> float:
        """Dense prompt-steps that measuring ``plans`` (in order) on ``prompts`` would run now: the
        unmeasured ones through :meth:`Rollouts.planned_units`, measured ones (checkpoint) free."""
        new = [p for p in plans if not self.store.has(group, p, self.policy)]
        if not new:
            return 0.0
        return sum(ro.planned_units(new) * len(ro.prompts) for ro in self._chunks(group, prompts))

    def forecast(self, calib: Sequence[str], held: Sequence[str], plans: Sequence[PrunePlan], further: int,
                 best: PrunePlan | None) -> float:
        """Re-set the bar's total to the work done plus what is left, and return that total.

        What is left: this round's ``plans`` (exact, :meth:`planned`), ``further`` more measurements at
        this round's mean cost per plan (the search may stop earlier; then the next forecast drops
        them), and the held-out check of ``best`` (this round's first plan before any is measured).
        """
        done = self.units
        now = self.planned("calib", calib, plans)
        new = [p for p in plans if not self.store.has("calib", p, self.policy)]
        base = sum(ro.planned_units([]) * len(ro.prompts) for ro in self._chunks("calib", calib)) if new else 0.0
        mean = (now - base) / len(new) if new else 0.0  # per plan, the dense run (if still to run) aside
        pick = best if best is not None else (plans[0] if plans else None)
        check = 0.0
        if held and pick is not None:  # validate(): the errors, then a re-run of the pick to decode it
            runs = [pick] * sum(not self.store.has(g, pick, self.policy) for g in ("holdout", "holdout-psnr"))
            check = sum(ro.planned_units(runs) * len(ro.prompts) for ro in self._chunks("holdout", held)) if runs else 0.0
        total = done + now + max(0, further) * mean + check
        self.forecasts.append(total)
        if self._bar is not None:
            self._bar.total = max(total, self._bar.n, 1)
            self._bar.refresh()
        logger.debug("calibration forecast: %.1f done + %.1f this round + %d x %.1f later + %.1f held-out = %.1f "
                     "dense prompt-steps", done, now, max(0, further), mean, check, total)
        return total

    def _chunks(self, group: str, prompts: Sequence[str]) -> list[Any]:
        from tokprune.calibrate.rollout import Rollouts

        out = []
        for i in range(0, len(prompts), self.batch_size):
            key = (group, i)
            if key not in self._rollouts:
                part = list(prompts[i : i + self.batch_size])

                def tick(units: float, n: int = len(part)) -> None:
                    self.calls += 1
                    self.units += units * n
                    if self._bar is not None:
                        self._bar.update(units * n)

                self._rollouts[key] = Rollouts(self.pipe, part, policy=self.policy, on_step=tick, **self.settings)
            out.append(self._rollouts[key])
        return out

    def errors(self, group: str, prompts: Sequence[str], plan: PrunePlan) -> list[float]:
        cached = self.store.get(group, plan, self.policy)
        if cached is not None:
            return cached
        errs: list[float] = []
        for ro in self._chunks(group, prompts):
            errs += ro.errors(plan).tolist()
        self.store.put(group, plan, self.policy, errs)
        return errs

    def error(self, group: str, prompts: Sequence[str], plan: PrunePlan) -> float:
        errs = self.errors(group, prompts, plan)
        return float(sum(errs) / len(errs))

    def validate(self, prompts: Sequence[str], plan: PrunePlan) -> dict[str, Any]:
        """Held-out check: latent error and decoded-image PSNR of ``plan`` vs dense on unseen prompts."""
        from tokprune.fidelity import capped_psnr

        group = "holdout"
        errs = self.errors(group, prompts, plan)
        cached = self.store.get(group + "-psnr", plan, self.policy)
        if cached is None:
            cached = []
            for ro in self._chunks(group, prompts):
                cached += [float(x) for x in capped_psnr(ro.decode(ro.run(plan)), ro.decode(ro.dense()))]
            self.store.put(group + "-psnr", plan, self.policy, cached)
        return {"num_prompts": len(errs), "error": float(sum(errs) / len(errs)),
                "psnr_db": float(sum(cached) / len(cached)), "per_prompt_error": errs}


def _freeze(
    pipe: Any, plan: PrunePlan, geometry: Geometry, stats: dict[str, Any], *, model: str | None, height: int,
    width: int, steps: int, guidance: float, budget: float, policy: str, reuse: str, align: int,
) -> Schedule:
    """The :class:`Schedule` of ``plan``: its buckets, per-step plan entries and MAC accounting."""
    from tokprune.models import fingerprint

    n, t = geometry.num_tokens, geometry.text_tokens
    keeps = [(plan.image_k(s, n), plan.text_k(s, t), plan.is_cached(s)) for s in range(steps)]
    buckets = tuple(sorted({Bucket(k, tk, c) for k, tk, c in keeps if k > 0} | {Bucket(n, t)}, key=lambda b: b.order,
                           reverse=True))
    entries = tuple(REUSE if k == 0 else Bucket(k, tk, c).key for k, tk, c in keeps)
    stats["warmup"] = next((s for s in range(steps) if not plan.is_dense(s)), steps)
    stats["plan"] = describe(plan)
    stats["probe_steps"] = list(plan.probe_steps())
    if plan.step_cache is not None:  # step caching (U-Nets' DeepCache): which steps reuse the deep feature
        stats["cached_steps"] = [s for s in range(steps) if plan.is_cached(s)]
    stats["macs"] = {
        "batch": geometry.batch,
        "dense_step": dense_macs(geometry),
        "per_bucket": {b.key: step_macs(geometry, b.image_keep, b.text_keep, reuse, cached=b.cached) for b in buckets},
        "probe_extra": step_macs(geometry, n, t, reuse, probe=True) - dense_macs(geometry),
    }
    scheduler = pipe.scheduler
    sched = Schedule(
        family=family_for(pipe).name,
        model=model or str(getattr(pipe.config, "_name_or_path", None) or "custom"),
        model_fingerprint=fingerprint(family_for(pipe).denoiser(pipe)),
        height=height,
        width=width,
        vae_scale_factor=int(pipe.vae_scale_factor),
        num_tokens=n,
        text_tokens=t,
        steps=steps,
        scheduler=type(scheduler).__name__,
        scheduler_config={k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        guidance=float(guidance),
        budget=budget,
        mac_fraction=mac_fraction(geometry, plan, reuse),
        policy=policy,
        buckets=buckets,
        plan=entries,
        reuse=reuse,
        align=align,
        stats=stats,
    )
    logger.info("schedule %s: mac_fraction %.4f (budget %.3f), buckets %s", sched.key, sched.mac_fraction, budget,
                [b.key for b in buckets])
    return sched



BASELINES = ("cat", "ras", "interleaved", "cache")


def baseline_schedule(
    pipe: Any,
    baseline: str = "cat",
    *,
    budget: float,
    steps: int = 28,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    max_sequence_length: int | None = None,
    model: str | None = None,
    policy: str | None = None,
    reuse: str = "noise",
    align: int | None = None,
    **options: Any,
) -> Schedule:
    """A fixed baseline (:mod:`tokprune.calibrate.baselines`) at ``budget``, frozen as :func:`calibrate` freezes.

    Nothing is measured: ``baseline`` is ``"cat"`` (``t0`` dense steps, then one K), ``"ras"``,
    ``"interleaved"`` or ``"cache"`` (families with step caching, DeepCache-style: :func:`cache_plan`);
    ``options`` go to that function (e.g. ``t0=8``). Settings default as in :func:`calibrate`;
    ``align`` defaults to :func:`~tokprune.calibrate.baselines.derive_align`.

    Example::

        from tokprune.calibrate.api import baseline_schedule
        sched = baseline_schedule(load_pipeline("sd3-tiny"), "cat", budget=0.5, steps=8, model="sd3-tiny")
    """
    from tokprune.calibrate import baselines
    from tokprune.models import call_defaults

    if baseline not in BASELINES:
        raise ConfigError(f"baseline {baseline!r} is unknown; expected one of {', '.join(BASELINES)}")
    if baseline == "cache" and not family_for(pipe).step_caching:
        raise ConfigError(f"baseline 'cache' needs a model family with step caching; {family_for(pipe).name} has none "
                          f"(use one of {', '.join(b for b in BASELINES if b != 'cache')})")
    if policy is None:
        policy = family_for(pipe).default_policy
    height, width, geometry = check_inputs(
        pipe, budget=budget, steps=steps, height=height, width=width, max_buckets=4, policy=policy,
        max_sequence_length=max_sequence_length, reuse=reuse,
    )
    guidance = float(call_defaults(pipe).get("guidance_scale", 7.0) if guidance is None else guidance)
    geometry = geometry.with_batch(2 if guidance > 1.0 else 1)
    align = derive_align(geometry.num_tokens) if align is None else int(align)
    if baseline == "interleaved":
        plan = baselines.interleaved_schedule(geometry, steps, budget, reuse=reuse, **options)
    elif baseline == "cache":
        plan = cache_plan(geometry, steps, budget, align=align, reuse=reuse, **options)
    else:
        make = baselines.cat_schedule if baseline == "cat" else baselines.ras_schedule
        plan = make(geometry, steps, budget, align=align, reuse=reuse, **options)
    stats = {"method": f"baseline:{baseline} (tokprune.calibrate.baselines, not measured)", "options": dict(options)}
    return _freeze(pipe, plan, geometry, stats, model=model, height=height, width=width, steps=steps,
                   guidance=guidance, budget=float(budget), policy=policy, reuse=reuse, align=align)


def cache_plan(geometry: Any, steps: int, budget: float, *, align: int, interval: int = 2, warmup: int = 1,
               text: float = 1.0, reuse: str = "noise", max_buckets: int = 4) -> PrunePlan:  # fmt: skip
    """A step-caching (DeepCache-style) plan at ``budget``: ``warmup`` dense steps, then every ``interval``-th
    step full and the others cached, one keep count K (never below ``geometry.min_keep``) solved to the
    budget, text kept at ``text`` of T. The calibration search's structure with ``cache=interval``
    (:func:`tokprune.calibrate.search.realize`); raises :class:`ConfigError` when the budget is out of reach.
    """
    from tokprune.calibrate.search import Structure, realize

    st = Structure(int(warmup), cache=int(interval), text=float(text))
    plan = realize(st, geometry, steps, budget, align=align, max_buckets=max_buckets, reuse=reuse)
    if plan is None:
        raise ConfigError(
            f"the cache baseline (warm-up {warmup}, interval {interval}, text {text:g}) cannot reach --budget {budget:g} "
            f"within {TOLERANCE:g} in {steps} steps; change the budget, interval= or warmup="
        )
    return plan
