"""``calibrate(pipe, budget=..., steps=...) -> Schedule``: profile, optimise, freeze.

Example::

    from tokprune.models import load_pipeline
    from tokprune.calibrate import calibrate

    pipe = load_pipeline("sd3-tiny")
    sched = calibrate(pipe, budget=0.5, steps=28, num_prompts=16, model="sd3-tiny")
    sched.save("schedule.json")
    sched.mac_fraction   # within 0.02 of 0.5
"""

from __future__ import annotations

import dataclasses

import logging
from typing import Any, Sequence

from tokprune.calibrate.optimize import TOLERANCE, cat_schedule, estimate_error, optimize_schedule
from tokprune.calibrate.profile import ErrorProfile, derive_align, load_prompts, pick_prompts, profile_pipeline
from tokprune.calibrate.schedule import REUSE, Bucket, Schedule
from tokprune.errors import ConfigError, ShapeError
from tokprune.pruning.geometry import REUSE_MODES, Geometry
from tokprune.pruning.macs import dense_macs, step_macs

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "check_inputs"]


NO_REUSE_ERROR = 1e9  # error charged for a reuse step when allow_reuse=False


def check_inputs(
    pipe: Any,
    *,
    budget: float,
    steps: int,
    height: int | None,
    width: int | None,
    max_buckets: int,
    policy: str,
    max_sequence_length: int | None,
    reuse: str,
) -> tuple[int, int, Geometry]:
    """Validate everything cheap before any model call. Returns (height, width, geometry at batch 1).

    ``None`` for height / width / max_sequence_length means the model's call defaults
    (:func:`tokprune.models.call_defaults`), else the pipeline's default size and T5 length 256.
    """
    from tokprune.models import call_defaults
    from tokprune.pruning.policies import make_policy

    model_defaults = call_defaults(pipe)
    height = model_defaults.get("height") if height is None else height
    width = model_defaults.get("width") if width is None else width
    if max_sequence_length is None:
        max_sequence_length = int(model_defaults.get("max_sequence_length", 256))

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"--budget {budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--steps {steps!r}; expected an int >= 2 (step 0 always runs dense)")
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ConfigError(f"--max-buckets {max_buckets!r}; expected an int >= 1 (the dense bucket takes one)")
    if reuse not in REUSE_MODES:
        raise ConfigError(f"reuse={reuse!r}; expected one of {REUSE_MODES}")
    if not 1 <= int(max_sequence_length) <= 512:
        raise ConfigError(f"--max-sequence-length {max_sequence_length}; expected 1..512 (T5 limit)")
    make_policy(policy)  # unknown name -> ConfigError listing the choices
    if budget < 1.0 / steps - TOLERANCE:
        raise ConfigError(
            f"--budget {budget:g} is below what {steps} steps can reach: step 0 always runs dense, i.e. at least "
            f"{1 / steps:.3f} of dense MACs; raise --budget or --steps"
        )
    vsf = int(pipe.vae_scale_factor)
    patch = int(pipe.transformer.config.patch_size)
    default = int(pipe.default_sample_size) * vsf
    height = default if height is None else int(height)
    width = default if width is None else int(width)
    multiple = vsf * patch
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ShapeError(
            f"resolution {height}x{width} is not a positive multiple of {multiple} (VAE scale factor {vsf} x patch "
            f"{patch}); pass --height/--width that are multiples of {multiple}, e.g. {default}x{default}"
        )
    text_tokens = int(pipe.tokenizer.model_max_length) + int(max_sequence_length)
    geometry = Geometry.from_config(
        pipe.transformer.config, batch=1, latent_hw=(height // vsf, width // vsf), text_tokens=text_tokens
    )
    return height, width, geometry


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
    policy: str = "cat",
    num_prompts: int | None = 16,
    seed: int = 0,
    batch_size: int = 4,
    max_sequence_length: int | None = None,
    prune_text: bool = True,
    reuse: str = "noise",
    model: str | None = None,
    profile: ErrorProfile | None = None,
    allow_reuse: bool = True,
    progress: bool = True,
) -> Schedule:
    """Calibrate a keep schedule for ``pipe`` under a MAC ``budget`` and freeze it into buckets.

    Args that matter:
        pipe: a ``StableDiffusion3Pipeline`` (e.g. ``tokprune.models.load_pipeline("sd3-tiny")``); its
            scheduler is used as configured.
        budget: fraction of a dense run's transformer MACs, in (0, 1]; 1.0 gives the all-dense schedule.
        steps, height, width, guidance, max_sequence_length: exactly as the pipeline will be called later
            (None: the model's call defaults from ``tokprune.models.call_defaults``, else the pipeline's
            default size, guidance 7.0, T5 length 256).
        max_buckets: static shapes allowed, the dense one included (recommended 3-4).
    Args to tinker with:
        prompts: calibration prompts (default: the ~80 shipped ones); ``num_prompts`` picks that many,
            evenly spread (16 is a good speed/robustness trade-off; None = all).
        policy: selection policy the runtime will use (``"cat"``, ``"dynamics"``, ``"random"``).
        prune_text: let the optimizer prune text tokens too.
        allow_reuse: let the optimizer replace whole steps by the previous step's prediction (K = 0, no
            transformer call). False = token pruning only.
        profile: a profile from :func:`~tokprune.calibrate.profile.profile_pipeline` to re-optimise for a
            new budget / bucket limit without re-running the model.
        model: the source string recorded in the schedule (what ``--model`` was).

    Returns a :class:`Schedule` with ``mac_fraction`` within 0.02 of ``budget`` and at most
    ``max_buckets`` buckets. Raises :class:`~tokprune.errors.ConfigError` / ``ShapeError`` for bad inputs.
    """
    from tokprune.models import call_defaults, fingerprint

    model_defaults = call_defaults(pipe)
    height = height if height is not None else model_defaults.get("height")
    width = width if width is not None else model_defaults.get("width")
    guidance = float(model_defaults.get("guidance_scale", 7.0) if guidance is None else guidance)
    if max_sequence_length is None:
        max_sequence_length = int(model_defaults.get("max_sequence_length", 256))
    height, width, geometry = check_inputs(
        pipe,
        budget=budget,
        steps=steps,
        height=height,
        width=width,
        max_buckets=max_buckets,
        policy=policy,
        max_sequence_length=max_sequence_length,
        reuse=reuse,
    )
    budget = float(budget)
    cfg = guidance > 1.0
    geometry = geometry.with_batch(2 if cfg else 1)  # one prompt per call; ratios do not depend on batch
    source = "built-in" if prompts is None else "user"
    all_prompts = load_prompts() if prompts is None else [p.strip() for p in prompts if p and p.strip()]
    if not all_prompts:
        raise ConfigError("no calibration prompts given (all empty); pass --prompts FILE with one prompt per line")
    chosen = pick_prompts(all_prompts, num_prompts)
    if profile is not None and (
        profile.steps != steps
        or profile.num_tokens != geometry.num_tokens
        or profile.text_tokens != geometry.text_tokens
    ):
        raise ConfigError(
            f"the given profile has {profile.steps} steps, N={profile.num_tokens}, T={profile.text_tokens}; "
            f"this call needs {steps} steps, N={geometry.num_tokens}, T={geometry.text_tokens}"
        )
    align = derive_align(geometry.num_tokens)
    stats: dict[str, Any] = {
        "method": "dp-knapsack+bucket-fit+rebalance",
        "tolerance": TOLERANCE,
        "calibration": {
            "prompt_source": source,
            "num_prompts": len(chosen),
            "seed": seed,
            "batch_size": batch_size,
            "max_sequence_length": max_sequence_length,
            "prune_text": bool(prune_text),
        },
    }
    if budget >= 1.0:
        logger.info("budget 1.0: all-dense schedule, no profiling needed")
        image_keep = (geometry.num_tokens,) * steps
        text_keep = (geometry.text_tokens,) * steps
        fraction, error, warmup = 1.0, 0.0, steps
    else:
        if profile is None:
            profile = profile_pipeline(
                pipe,
                chosen,
                steps=steps,
                guidance=guidance,
                height=height,
                width=width,
                policy=policy,
                seed=seed,
                batch_size=batch_size,
                max_sequence_length=max_sequence_length,
                reuse=reuse,
                prune_text=prune_text,
                progress=progress,
            )
        if not allow_reuse:  # make reuse steps unaffordable for the optimizer; the recorded stats stay honest
            profile_for_opt = dataclasses.replace(profile, reuse_error=tuple(NO_REUSE_ERROR for _ in profile.reuse_error))
        else:
            profile_for_opt = profile
        alloc = optimize_schedule(
            geometry, profile_for_opt, budget, max_buckets=max_buckets, align=align, reuse=reuse, prune_text=prune_text
        )
        image_keep, text_keep = alloc.image_keep, alloc.text_keep
        fraction, error, warmup = alloc.mac_fraction, alloc.error, alloc.warmup
        cat = cat_schedule(geometry, steps, budget, reuse=reuse)
        from tokprune.pruning.macs import mac_fraction

        stats["profile"] = profile.to_stats()
        stats["cat_reference"] = {
            "image_keep": [cat.image_k(s, geometry.num_tokens) for s in range(steps)],
            "mac_fraction": mac_fraction(geometry, cat, reuse),
            "estimated_error": estimate_error(profile, cat),
        }
    stats["warmup"] = warmup
    stats["estimated_error"] = error

    buckets = tuple(sorted({Bucket(k, t) for k, t in zip(image_keep, text_keep) if k > 0}, reverse=True))
    plan = tuple(REUSE if k == 0 else Bucket(k, t).key for k, t in zip(image_keep, text_keep))
    stats["macs"] = {
        "batch": geometry.batch,
        "dense_step": dense_macs(geometry),
        "per_bucket": {b.key: step_macs(geometry, b.image_keep, b.text_keep, reuse) for b in buckets},
    }
    scheduler = pipe.scheduler
    sched = Schedule(
        model=model or str(getattr(pipe.config, "_name_or_path", None) or "custom"),
        model_fingerprint=fingerprint(pipe.transformer),
        height=height,
        width=width,
        vae_scale_factor=int(pipe.vae_scale_factor),
        num_tokens=geometry.num_tokens,
        text_tokens=geometry.text_tokens,
        steps=steps,
        scheduler=type(scheduler).__name__,
        scheduler_config={k: v for k, v in dict(scheduler.config).items()},
        guidance=float(guidance),
        budget=budget,
        mac_fraction=fraction,
        policy=policy,
        buckets=buckets,
        plan=plan,
        reuse=reuse,
        align=align,
        stats=stats,
    )
    logger.info(
        "schedule %s: mac_fraction %.4f (budget %.3f), warm-up %d, buckets %s",
        sched.key,
        fraction,
        budget,
        warmup,
        [b.key for b in buckets],
    )
    return sched
