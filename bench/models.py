"""Benchmark models: SD3-architecture pipelines with random weights at sizes where pruning matters.

The tiny built-in (``sd3-tiny``, N = 256, D = 32) is plumbing-sized: fixed per-call costs
dominate it. :func:`build_bench_pipeline` keeps the tiny pipeline's text encoders, tokenizers,
VAE and scheduler (all cheap) and swaps in an SD3 MMDiT of a chosen size, so the transformer
dominates the run as it does for SD3-medium. ``save_bench_model(DIR)`` writes it as a diffusers
directory that every CLI accepts as ``--model DIR``.

Sizes (:data:`BENCH_SIZES`), all SD3 blocks (the last one ``context_pre_only``), patch 2,
16 latent channels, VAE scale factor 2:

======== ====== ====== ============ ===================== ==========================
name     layers hidden heads x dim image px -> tokens N   params (transformer)
======== ====== ====== ============ ===================== ==========================
medium   6      384    6 x 64       128 x 128 -> 1024     ~30 M
large    12     768    12 x 64      256 x 256 -> 4096     ~230 M
======== ====== ====== ============ ===================== ==========================

Random weights measure speed, never quality.

Example::

    from tokprune.runtime.bench_models import save_bench_model
    save_bench_model("models/sd3-bench-medium", size="medium")
    # then: tokprune-calibrate --model models/sd3-bench-medium --budget 0.5 --max-sequence-length 77 ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["BENCH_SIZES", "build_bench_pipeline", "save_bench_model"]

BENCH_SIZES: dict[str, dict[str, Any]] = {
    "medium": {"num_layers": 6, "num_attention_heads": 6, "attention_head_dim": 64, "sample_size": 64},
    "large": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "sample_size": 128},
}


def build_bench_pipeline(size: str = "medium", *, seed: int = 0) -> Any:
    """A ``StableDiffusion3Pipeline`` with the tiny pipeline's other parts and a ``size`` transformer."""
    from diffusers import SD3Transformer2DModel

    from tokprune.models import build_tiny_pipeline, tiny_transformer_config

    if size not in BENCH_SIZES:
        raise ConfigError(f"bench model size {size!r} is unknown; expected one of {sorted(BENCH_SIZES)}")
    shape = BENCH_SIZES[size]
    config = tiny_transformer_config(
        "sd3",
        pos_embed_max_size=max(96, 3 * shape["sample_size"] // 2),
        **shape,
    )
    pipe = build_tiny_pipeline("sd3", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        transformer = SD3Transformer2DModel(**config).eval()
    pipe.transformer = transformer
    # The pipeline's default size follows the transformer's sample_size.
    pipe.default_sample_size = int(config["sample_size"])
    return pipe


def save_bench_model(directory: str | Path, size: str = "medium", *, seed: int = 0) -> Path:
    """Write :func:`build_bench_pipeline` as a diffusers directory usable as ``--model DIR``."""
    directory = Path(directory)
    pipe = build_bench_pipeline(size, seed=seed)
    pipe.save_pretrained(str(directory))
    logger.info("wrote the %s bench model to %s", size, directory)
    return directory


def cat_reference_schedule(
    model: str, *, budget: float = 0.5, steps: int = 10, guidance: float = 7.0, max_sequence_length: int = 32,
    align: int = 64, policy: str = "cat",
) -> Any:
    """The CAT-Pruning reference schedule as a :class:`~tokprune.calibrate.schedule.Schedule` (no calibration).

    Dense warm-up for ``round(8/28 * steps)`` steps, then one constant image keep K (a multiple of
    ``align``) whose MAC fraction is closest to ``budget``; text is never pruned
    (:func:`tokprune.calibrate.baselines.cat_schedule`). Export it with ``tokprune-export --schedule``.
    """
    from tokprune.calibrate.baselines import cat_schedule
    from tokprune.calibrate.schedule import REUSE, Bucket, Schedule
    from tokprune.pruning.geometry import Geometry
    from tokprune.pruning.macs import mac_fraction

    from tokprune.models import fingerprint, load_pipeline

    pipe = load_pipeline(model)
    vsf = int(pipe.vae_scale_factor)
    size = int(pipe.default_sample_size) * vsf
    text = int(pipe.tokenizer.model_max_length) + int(max_sequence_length)
    batch = 2 if guidance > 1.0 else 1
    g = Geometry.from_config(pipe.transformer.config, batch=batch, latent_hw=(size // vsf, size // vsf), text_tokens=text)
    plan = cat_schedule(g, steps, budget, align=align)
    n = g.num_tokens
    keys = [REUSE if k == 0 else Bucket(n if k < 0 else k, text).key for k in plan.image_keep]
    return Schedule(
        model=model, model_fingerprint=fingerprint(pipe.transformer), height=size, width=size, vae_scale_factor=vsf,
        num_tokens=n, text_tokens=text, steps=steps, scheduler=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config), guidance=guidance, budget=budget,
        mac_fraction=mac_fraction(g, plan), policy=policy,
        buckets=tuple(sorted({Bucket.from_key(k) for k in keys if k != REUSE}, reverse=True)), plan=tuple(keys),
        align=align, stats={"method": "cat-reference (tokprune.calibrate.baselines.cat_schedule)"},
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tokprune.runtime.bench_models {model DIR | cat-schedule --model DIR --out FILE}``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tokprune.runtime.bench_models", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="write a bench model directory (usable as --model DIR)")
    m.add_argument("directory", type=Path)
    m.add_argument("--size", default="medium", choices=sorted(BENCH_SIZES))
    c = sub.add_parser("cat-schedule", help="write the CAT reference schedule (export it with tokprune-export --schedule)")
    c.add_argument("--model", required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--budget", type=float, default=0.5)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--guidance", type=float, default=7.0)
    c.add_argument("--max-sequence-length", type=int, default=32)
    args = p.parse_args(argv)
    if args.cmd == "model":
        print(save_bench_model(args.directory, args.size))
        return 0
    sched = cat_reference_schedule(args.model, budget=args.budget, steps=args.steps, guidance=args.guidance,
                                   max_sequence_length=args.max_sequence_length)
    sched.save(args.out)
    print(f"{args.out}: plan {list(sched.plan)}, mac_fraction {sched.mac_fraction:.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
