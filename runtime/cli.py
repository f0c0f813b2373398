"""``tokprune-generate``: one image from exported engines inside a diffusers SD3 pipeline.

The pipeline's other parts (text encoders, tokenizers, VAE, scheduler) are loaded from the model
recorded in the export's manifest; the transformer is the runtime (:func:`tokprune.runtime.attach`).

Example::

    tokprune-generate --engines engines/sd3-tiny-64x64-s8-b0.5 --prompt "a red circle" --seed 0 --out circle.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokprune.errors import ConfigError, ModelNotFoundError, TokpruneError

logger = logging.getLogger("tokprune.runtime")

PROG = "tokprune-generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Generate an image with a tokprune export: the diffusers StableDiffusion3Pipeline of the model recorded "
            "in the manifest, with its transformer replaced by the bucket engines. Resolution, steps and guidance "
            "default to what the engines were built for; other values are refused with the command that rebuilds."
        ),
        epilog='Example: tokprune-generate --engines engines/sd3-tiny-64x64-s8-b0.5 --prompt "a red circle" --out a.png',
    )
    main = p.add_argument_group("what matters")
    main.add_argument("--engines", type=Path, required=True, help="an export directory written by tokprune-export")
    main.add_argument("--prompt", required=True, help="the text prompt")
    main.add_argument("--out", type=Path, default=Path("tokprune.png"), help="PNG to write (default tokprune.png)")
    main.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    main.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or torch")
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument("--steps", type=int, help="denoising steps (default: the engines')")
    tinker.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the engines')")
    tinker.add_argument("--height", type=int, help="image height (default: the engines')")
    tinker.add_argument("--width", type=int, help="image width (default: the engines')")
    tinker.add_argument("--negative-prompt", default=None, help="negative prompt (CFG)")
    tinker.add_argument("--device", default=None, help="cpu or cuda (default: cuda for tensorrt, else cpu)")
    tinker.add_argument("--dense", action="store_true", help="run the dense bucket at every step (no pruning)")
    tinker.add_argument("--quiet", action="store_true", help="no progress bar")
    tinker.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def load_components(manifest: Any, *, device: torch.device, dtype: torch.dtype, with_transformer: bool) -> Any:
    """The pipeline of the manifest's model; without its transformer weights unless asked (engines replace it)."""
    from tokprune.models import load_pipeline, resolve_model

    ref = manifest.data["model"]["ref"]
    source = resolve_model(ref)
    if source.kind == "builtin" or with_transformer:
        return load_pipeline(ref, dtype=dtype, device=device)
    from diffusers import StableDiffusion3Pipeline

    from tokprune.models import _dtype_kwarg

    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            source.ref, transformer=None, local_files_only=True, **_dtype_kwarg(dtype)
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"the export was made from {ref!r}, whose text encoders and VAE did not load from local files "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Make the model available "
            f"locally (a diffusers directory or the Hugging Face cache) and re-run."
        ) from exc
    return pipe.to(device)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-generate``; returns the exit status (0 ok, 1 error, 2 usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    try:
        return _generate(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TokpruneError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _generate(args: argparse.Namespace) -> int:
    from tokprune.runtime.runners import RuntimeBackend

    from tokprune import runtime

    backend = RuntimeBackend.parse(args.backend)
    rt = runtime.load(args.engines, backend=backend, device=args.device, pruned=not args.dense)
    data = rt.manifest.data
    g = rt.manifest.geometry
    pipe = load_components(rt.manifest, device=rt.device, dtype=rt.dtype, with_transformer=False)
    pipe.set_progress_bar_config(disable=args.quiet)
    runtime.attach(pipe, rt)
    steps = args.steps if args.steps is not None else int(data["steps"])
    guidance = args.guidance if args.guidance is not None else float(data["guidance"])
    height = args.height if args.height is not None else int(data["height"])
    width = args.width if args.width is not None else int(data["width"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=g.text_tokens - int(pipe.tokenizer.model_max_length),
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
        ).images[0]
    seconds = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(
        f"{args.out}: {width}x{height}, {steps} steps, guidance {guidance:g}, seed {args.seed}, "
        f"{backend.value} {'dense' if args.dense else 'pruned'} ({rt.calls} engine calls), {seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main())
