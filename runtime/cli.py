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

from tokprune.console import add_common, run_cli
from tokprune.errors import BackendUnavailableError, ConfigError, ModelNotFoundError
from tokprune.fsutil import IMAGE_EXTENSIONS, atomic_output, check_output_file

logger = logging.getLogger("tokprune.runtime")

PROG = "tokprune-generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Generate an image with a tokprune export: the diffusers StableDiffusion3Pipeline of the model recorded "
            "in the manifest, with its transformer replaced by the bucket engines. Resolution and steps default to "
            "what the engines were built for, and other values are refused with the command that rebuilds; "
            "--guidance may change only within what the engines' batch allows (> 1 for engines built with "
            "classifier-free guidance, <= 1 for engines built without)."
        ),
        epilog='Example: tokprune-generate --engines engines/sd3-tiny-64x64-s8-b0.5 --prompt "a red circle" --out a.png',
    )
    main = p.add_argument_group("what matters")
    main.add_argument("--engines", type=Path, required=True, help="an export directory written by tokprune-export")
    main.add_argument("--prompt", required=True, help="the text prompt")
    main.add_argument("--out", type=Path, default=Path("tokprune.png"),
                      help=f"image to write: {', '.join(IMAGE_EXTENSIONS)} (default tokprune.png)")
    main.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    main.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or torch")
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument("--steps", type=int, help="denoising steps (default: the engines')")
    tinker.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the engines')")
    tinker.add_argument("--height", type=int, help="image height (default: the engines')")
    tinker.add_argument("--width", type=int, help="image width (default: the engines')")
    tinker.add_argument("--negative-prompt", default=None, help="negative prompt (CFG)")
    tinker.add_argument("--device", default=None, help="cpu or cuda (default: cuda for tensorrt, else cpu)")
    tinker.add_argument("--cuda-graphs", action="store_true",
                        help="capture one CUDA graph per bucket and replay it every step (torch and tensorrt backends, CUDA)")
    tinker.add_argument("--layout", choices=("single", "per-bucket"), default=None,
                        help="run the one dynamic-K graph for all buckets, or one static graph per bucket "
                             "(default: single on CUDA / TensorRT, per-bucket for ONNX Runtime on the CPU)")
    tinker.add_argument("--dense", action="store_true", help="run the dense bucket at every step (no pruning)")
    return add_common(p)


def load_components(manifest: Any, *, device: torch.device, dtype: torch.dtype, with_transformer: bool) -> Any:
    """The pipeline of the manifest's model; without its transformer weights unless asked (engines replace it)."""
    from tokprune.models import load_pipeline, resolve_model

    ref = manifest.data["model"]["ref"]
    source = resolve_model(ref)
    if source.kind == "builtin" or with_transformer:
        return load_pipeline(ref, dtype=dtype, device=device)
    from diffusers import DiffusionPipeline

    from tokprune.models import dtype_kwarg
    from tokprune.pruning.family import get_family

    attr = get_family(manifest.geometry.family).denoiser_attr  # transformer, or unet for U-Nets
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source.ref, **{attr: None}, local_files_only=True, **dtype_kwarg(dtype)
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"the export was made from {ref!r}, whose text encoders and VAE did not load from local files "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Make the model available "
            f"locally (a diffusers directory or the Hugging Face cache) and re-run."
        ) from exc
    return pipe.to(device)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-generate``; returns the exit status (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    return run_cli(build_parser(), argv, _generate)


def check_backend(backend: Any, device: str | None) -> None:
    """Refuse ``--backend tensorrt`` where it cannot run, saying why in one consistent order:
    TensorRT not installed, then no CUDA GPU, then ``--device cpu``."""
    from tokprune.export.spec import Backend

    if backend is not Backend.TENSORRT:
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"--device {device}: no CUDA GPU is visible on this host; use --device cpu")
        return
    from tokprune.export.tensorrt import gpu_info, tensorrt_version

    if tensorrt_version() is None:
        raise BackendUnavailableError(
            "--backend tensorrt: TensorRT is not installed here (pip install 'tokprune[tensorrt]' on a host with a "
            "CUDA GPU); use --backend onnxruntime"
        )
    if gpu_info() is None:
        raise BackendUnavailableError("--backend tensorrt needs a CUDA GPU and this host has none; use --backend onnxruntime")
    if device is not None and not str(device).startswith("cuda"):
        raise ConfigError(f"--backend tensorrt runs on a CUDA GPU only, not --device {device}; drop --device or use --device cuda")


def check_call(data: dict[str, Any], *, steps: int | None, height: int | None, width: int | None,
               guidance: float | None, rebuild: str) -> tuple[int, int, int, float]:
    """(steps, height, width, guidance) for the engines recorded in ``data`` (the manifest), or
    :class:`ConfigError` in flag words for a call the engines cannot run."""
    want_steps, want_h, want_w = int(data["steps"]), int(data["height"]), int(data["width"])
    built_guidance = float(data["guidance"])
    for flag, value in (("--steps", steps), ("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}; expected a positive integer")
    if steps is not None and steps != want_steps:
        raise ConfigError(
            f"--steps {steps}: the engines in this export were scheduled for {want_steps} steps; drop --steps (or pass "
            f"--steps {want_steps}), or build engines for {steps} steps: {rebuild.replace(f'--steps {want_steps}', f'--steps {steps}')}"
        )
    if (height is not None and height != want_h) or (width is not None and width != want_w):
        got = f"{height or want_h}x{width or want_w}"
        raise ConfigError(
            f"--height/--width {got}: the engines are static-shape for {want_h}x{want_w}; drop the flags, or build "
            f"engines for {got}: {rebuild}"
        )
    if guidance is not None:
        if guidance != guidance or guidance < 0:  # NaN or negative
            raise ConfigError(f"--guidance {guidance}; expected a number >= 0")
        if (guidance > 1.0) != (built_guidance > 1.0):
            batch = "2 (classifier-free guidance)" if built_guidance > 1.0 else "1 (no classifier-free guidance)"
            allowed = "a value > 1" if built_guidance > 1.0 else "a value <= 1"
            raise ConfigError(
                f"--guidance {guidance:g}: the engines were built with guidance {built_guidance:g}, batch {batch}; "
                f"pass {allowed} (or drop --guidance), or re-export with --guidance {guidance:g}"
            )
    return (steps or want_steps, height or want_h, width or want_w,
            built_guidance if guidance is None else float(guidance))


def _generate(args: argparse.Namespace) -> int:
    from tokprune.export.manifest import load_manifest
    from tokprune.export.spec import RUNTIME_BACKENDS, Backend
    from tokprune.runtime.verify import rebuild_command

    from tokprune import runtime

    out = check_output_file(args.out, flag="--out", extensions=IMAGE_EXTENSIONS)  # before any work
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty; pass the text to draw, e.g. --prompt \"a red circle\"")
    backend = Backend.parse(args.backend, choices=RUNTIME_BACKENDS)
    check_backend(backend, args.device)
    manifest = load_manifest(args.engines)
    steps, height, width, guidance = check_call(
        manifest.data, steps=args.steps, height=args.height, width=args.width, guidance=args.guidance,
        rebuild=rebuild_command(manifest),
    )
    rt = runtime.load(args.engines, backend=backend, device=args.device, pruned=not args.dense,
                      cuda_graphs=args.cuda_graphs, layout=args.layout)
    g = rt.manifest.geometry
    pipe = load_components(rt.manifest, device=rt.device, dtype=rt.dtype, with_transformer=False)
    pipe.set_progress_bar_config(disable=args.quiet)
    runtime.attach(pipe, rt)
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            **rt.family.call_kwargs(pipe, g),  # the text length the engines take
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
        ).images[0]
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:  # a full disk or an interrupt leaves no half-written image
        image.save(tmp)
    print(
        f"{out}: {width}x{height}, {steps} steps, guidance {guidance:g}, seed {args.seed}, "
        f"{backend.value} {'dense' if args.dense else 'pruned'} ({rt.calls} engine calls), {seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main())
