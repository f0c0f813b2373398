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

:func:`build_transformer` builds a bare transformer of a real architecture (:data:`TRANSFORMER_ARCHS`,
e.g. the full SD3-medium MMDiT) with random weights directly on the device, for loop benchmarks
(:mod:`tokprune.bench.scenarios.gpu_ready`); ``"tiny"`` is the offline tiny SD3 transformer.

Example::

    from tokprune.bench.models import save_bench_model
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

__all__ = ["BENCH_SIZES", "TRANSFORMER_ARCHS", "build_bench_pipeline", "build_transformer", "cat_reference_schedule",
           "save_bench_model"]

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


#: Real transformer architectures (diffusers ``SD3Transformer2DModel`` configs) for loop benchmarks.
TRANSFORMER_ARCHS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json: 24 blocks, hidden 1536, ~2.0 B parameters
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    # CPU-sized: 6 blocks, hidden 384 (6 heads x 64), 64x64 latent -> N = 1024 (results/gpu layout measurement)
    "sd3-cpu-medium": dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                           attention_head_dim=64, num_attention_heads=6, joint_attention_dim=384,
                           caption_projection_dim=384, pooled_projection_dim=256, pos_embed_max_size=64),
}


def build_transformer(arch: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> torch.nn.Module:
    """A random-weight transformer of ``arch`` (a :data:`TRANSFORMER_ARCHS` name, or ``"tiny"``), eval, no grad."""
    from diffusers import SD3Transformer2DModel

    from tokprune.models import build_tiny_transformer

    if arch == "tiny":
        model = build_tiny_transformer()
    elif arch in TRANSFORMER_ARCHS:
        torch.manual_seed(seed)
        with torch.device(device):  # initialised on the device: a 2 B model is slow to build on a CPU
            model = SD3Transformer2DModel(**TRANSFORMER_ARCHS[arch])
    else:
        raise ConfigError(f"transformer architecture {arch!r} is unknown; expected tiny or one of {sorted(TRANSFORMER_ARCHS)}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def cat_reference_schedule(
    model: str, *, budget: float = 0.5, steps: int = 10, guidance: float = 7.0, max_sequence_length: int = 32,
    align: int = 64, policy: str = "cat",
) -> Any:
    """The CAT-Pruning reference schedule of ``model`` as a :class:`~tokprune.calibrate.schedule.Schedule` (no calibration).

    Dense warm-up for ``round(8/28 * steps)`` steps, then one constant image keep K (a multiple of
    ``align``) whose MAC fraction is closest to ``budget``; text is never pruned
    (:func:`tokprune.calibrate.api.baseline_schedule` with ``"cat"``). Export it with ``tokprune-export --schedule``.
    """
    from tokprune.calibrate.api import baseline_schedule

    from tokprune.models import load_pipeline

    return baseline_schedule(load_pipeline(model), "cat", budget=budget, steps=steps, guidance=guidance,
                             max_sequence_length=max_sequence_length, model=model, policy=policy, align=align)


def main(argv: list[str] | None = None) -> int:
    """``python -m tokprune.bench.models {model DIR | cat-schedule --model DIR --out FILE}``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tokprune.bench.models", description=__doc__.splitlines()[0])
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
