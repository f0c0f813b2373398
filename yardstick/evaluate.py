"""Task metric for the yardstick: generate held-out captions, read the images back, score.

``evaluate`` works on any pipeline that generates 128x128 shapes scenes (the SD3 ``shapes`` or the
PixArt ``pixart-shapes``; the dense model, or the same pipeline with tokprune's pruning applied), so pruned and dense
runs are compared on the same captions and seeds (CPU generators: same noise on any device).

Example::

    from tokprune.yardstick.model import load_pipeline
    from tokprune.yardstick.evaluate import evaluate
    pipe, meta = load_pipeline("models/shapes", device="cuda")
    evaluate(pipe, n=64, guidance=meta.guidance_scale)["mean"]

CLI (reads the defaults from the model's ``yardstick.json``)::

    python -m tokprune.yardstick.evaluate --model models/shapes --n 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import numpy as np
import torch

from tokprune.yardstick.checker import as_uint8, score
from tokprune.yardstick.dataset import EVAL_SEED, IMAGE_SIZE, sample_spec

logger = logging.getLogger(__name__)


def default_max_sequence_length(pipe) -> int:
    """The T5 length the yardstick was trained with (its T5 tokenizer's ``model_max_length``: SD3's
    ``tokenizer_3``, PixArt's ``tokenizer``)."""
    t5 = getattr(pipe, "tokenizer_3", None) or getattr(pipe, "tokenizer", None)
    length = getattr(t5, "model_max_length", 256)
    return int(length) if length <= 512 else 256


@torch.no_grad()
def generate(
    pipe,
    captions: list[str],
    steps: int = 28,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
    max_sequence_length: int | None = None,
) -> np.ndarray:
    """(N, 128, 128, 3) uint8; image ``i`` uses a CPU generator seeded ``seed + i``."""
    length = max_sequence_length or default_max_sequence_length(pipe)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(
            prompt=chunk,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=length,
            generator=gens,
            output_type="np",
        ).images
        out.extend(as_uint8(img) for img in images)
    return np.stack(out)


def evaluate(
    pipe,
    n: int = 64,
    steps: int = 28,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
    max_sequence_length: int | None = None,
    split_seed: int = EVAL_SEED,
    return_images: bool = False,
) -> dict[str, Any]:
    """Attribute accuracy of ``pipe`` on the first ``n`` held-out captions.

    Returns the checker's metrics (``position, colour, shape, size, mean, object, image,
    extra``; see :func:`tokprune.yardstick.checker.score`) plus the settings and ``seconds``.
    With ``return_images=True`` also ``images`` ((n, 128, 128, 3) uint8) and ``captions``.
    """
    specs = [sample_spec(i, split_seed) for i in range(n)]
    captions = [s.caption for s in specs]
    t0 = time.perf_counter()
    images = generate(pipe, captions, steps, guidance, seed, batch_size, max_sequence_length)
    result: dict[str, Any] = score(images, specs)
    result.update(
        n=n,
        steps=steps,
        guidance=guidance,
        seed=seed,
        split_seed=split_seed,
        max_sequence_length=max_sequence_length or default_max_sequence_length(pipe),
        seconds=round(time.perf_counter() - t0, 2),
    )
    if return_images:
        result["images"], result["captions"] = images, captions
    return result


def save_grid(images: np.ndarray, path, columns: int = 8, scale: int = 2) -> None:
    """Write a PNG grid of uint8 HWC images (1 px gray separators)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 96, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m tokprune.yardstick.evaluate`` through the shared CLI runner (exit 0/1/2/130, one-line errors)."""
    from tokprune.console import add_common, run_cli

    ap = argparse.ArgumentParser(prog="python -m tokprune.yardstick.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="yardstick pipeline directory (with yardstick.json)")
    ap.add_argument("--n", type=int, default=64, help="held-out captions to generate (default 64)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 28)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", default=None, help="also write a PNG grid of the generated images here")
    return run_cli(add_common(ap), argv, _main)


def _main(args: argparse.Namespace) -> int:
    from tokprune.yardstick import model, pixart_model

    pixart = model.load_meta(args.model).config.get("arch") == "pixart"  # trained with --arch pixart
    pipe, meta = (pixart_model if pixart else model).load_pipeline(args.model, device=args.device)
    result = evaluate(
        pipe,
        n=args.n,
        steps=args.steps or meta.num_inference_steps,
        guidance=meta.guidance_scale if args.guidance is None else args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        max_sequence_length=meta.max_sequence_length,
        return_images=args.grid is not None,
    )
    if args.grid:
        save_grid(result.pop("images"), args.grid)
        result.pop("captions")
    result["model"], result["device"] = str(args.model), str(args.device)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
