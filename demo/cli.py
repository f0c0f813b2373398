"""``tokprune-demo`` (``make demo``): export engines for the offline default model, then show what they do.

One command, for a newcomer on a CPU machine:

1. calibrate a keep schedule under ``--budget`` exactly as ``tokprune-calibrate`` does by default
   (candidate schedules measured as whole sampling runs on 4 train-split captions, the pick validated
   on 2 others), and freeze it into buckets;
2. export every bucket to ONNX (``tokprune-export --schedule``), checked against PyTorch;
3. generate the same held-out prompts with the same seeds three times — PyTorch eager dense
   (diffusers as shipped), the dense bucket alone in ONNX Runtime, and the exported engines with
   the schedule in ONNX Runtime, all inside the unmodified pipeline — and write a picture grid
   (top row dense, bottom row pruned) next to a speed table that separates the export gain (ONNX
   Runtime dense vs eager dense) from the pruning gain (ONNX Runtime pruned vs ONNX Runtime dense).

For the ``shapes`` yardstick the checker also scores both rows (attribute accuracy).

Example::

    tokprune-demo --model shapes --budget 0.5
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "shapes"
FALLBACK_PROMPTS = ("a red circle", "two blue squares", "a green triangle on the left", "a yellow cross")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokprune-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to export (default {DEFAULT_MODEL}, offline)")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of dense transformer MACs (default 0.5)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps (default 16: quick on a CPU)")
    p.add_argument("--n", type=int, default=4, help="images in the grid (default 4)")
    p.add_argument("--calib-prompts", type=int, default=4, help="calibration prompts measured (default 4, as tokprune-calibrate)")
    p.add_argument("--holdout-prompts", type=int, default=2, help="prompts that validate the schedule (default 2)")
    p.add_argument(
        "--no-reuse-steps", action="store_true",
        help="token pruning only: calibration never replaces a whole step by the previous prediction",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", type=Path, help="export directory (default engines/<model>-<H>x<W>-s<S>-b<B>)")
    p.add_argument("--report", type=Path, default=Path("demo-output"), help="where the grid and table go")
    p.add_argument("--force", action="store_true",
                   help="replace a tokprune export at --engines that an earlier demo did not make (the demo replaces "
                        "its own exports; it never touches anything else)")
    from tokprune.console import add_common

    return add_common(p)


def _prompts(model: str, n: int, *, split_seed: int) -> list[str]:
    if model == "shapes":
        from tokprune.yardstick.dataset import sample_spec

        return [sample_spec(i, split_seed).caption for i in range(n)]
    return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)]


def _generate(pipe: Any, prompts: list[str], kwargs: dict[str, Any], seed: int) -> tuple[Any, float]:
    import torch

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    images = pipe(prompts, generator=gens, output_type="np", **kwargs).images
    return images, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from tokprune import runtime
    from tokprune.calibrate.api import calibrate
    from tokprune.export.exporter import ExportConfig, export_model
    from tokprune.demo.report import grid, table
    from tokprune.export.command import command_line
    from tokprune.models import call_defaults, load_pipeline
    from tokprune.pruning.family import family_for
    from tokprune.fidelity import psnr

    _precheck(args)  # bad flags and output places fail before the model loads
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    defaults = call_defaults(pipe)
    kwargs = {k: v for k, v in defaults.items() if k in ("height", "width", "guidance_scale", "max_sequence_length")}
    kwargs["num_inference_steps"] = args.steps
    calib = _prompts(args.model, args.calib_prompts + args.holdout_prompts, split_seed=0)  # train split
    shown = _prompts(args.model, args.n, split_seed=1)  # held-out split for the grid

    print(f"[1/3] calibrating {args.model} for budget {args.budget} on {len(calib)} prompts (whole runs measured, "
          f"{args.holdout_prompts} held out), {args.steps} steps", flush=True)
    resolved = family_for(pipe).settings(pipe, steps=args.steps)
    height, width = resolved.height, resolved.width
    schedule = calibrate(
        pipe, budget=args.budget, steps=args.steps, height=height, width=width, prompts=calib,
        num_prompts=args.calib_prompts, holdout_prompts=args.holdout_prompts,
        guidance=kwargs.get("guidance_scale"), max_sequence_length=kwargs.get("max_sequence_length"),
        model=args.model, progress=True, allow_reuse=not args.no_reuse_steps,
        checkpoint_dir=args.report / "calibration",
    )
    print(f"      schedule: mac_fraction {schedule.mac_fraction:.3f}, buckets {[b.key for b in schedule.buckets]}")

    print("[2/3] exporting buckets to ONNX (checked against PyTorch in ONNX Runtime)", flush=True)
    out = args.engines or Path("engines") / f"{args.model}-{height}x{width}-s{args.steps}-b{args.budget:g}"
    args.report.mkdir(parents=True, exist_ok=True)
    sched_path = args.report / "schedule.json"
    schedule.save(sched_path)
    command = command_line(["--model", args.model, "--schedule", str(sched_path)])
    export_model(ExportConfig(model=args.model, schedule_file=str(sched_path)), out,
                 force=args.force or _made_by_demo(out, command), progress=True, command=command)

    print(f"[3/3] generating {len(shown)} held-out prompts: eager dense, ONNX Runtime dense, ONNX Runtime pruned; "
          "same seeds", flush=True)
    _generate(pipe, shown[:1], {**kwargs, "num_inference_steps": 2}, args.seed)  # warm-up
    dense, t_dense = _generate(pipe, shown, kwargs, args.seed)
    engines = runtime.load(out, backend="onnxruntime")
    try:
        runtime.attach(pipe, engines)
        _generate(pipe, shown[:1], kwargs, args.seed)  # warm-up (first runs of every bucket's session)
        pruned, t_pruned = _generate(pipe, shown, kwargs, args.seed)
        runtime.detach(pipe)
        runtime.attach(pipe, engines.share(pruned=False))  # the same sessions, the dense bucket at every step
        ort_dense, t_ort_dense = _generate(pipe, shown, kwargs, args.seed)
    finally:
        runtime.detach(pipe)
        engines.close()

    def psnr_vs_dense(images: Any) -> float:  # of the whole row: one mean squared error over every pixel
        return float(psnr(np.concatenate(list(images)), np.concatenate(list(dense)))[0])

    result: dict[str, Any] = {
        "model": args.model, "budget": args.budget, "mac_fraction": _counted_fraction(engines), "steps": args.steps,
        "n": len(shown), "dense_s": t_dense, "ort_dense_s": t_ort_dense, "pruned_s": t_pruned,
        "speedup": t_dense / t_pruned,  # overall: ONNX Runtime pruned vs eager dense
        "export_gain": t_dense / t_ort_dense,  # ONNX Runtime dense vs eager dense
        "pruning_gain": t_ort_dense / t_pruned,  # ONNX Runtime pruned vs ONNX Runtime dense
        "psnr_db": psnr_vs_dense(pruned), "ort_dense_psnr_db": psnr_vs_dense(ort_dense), "engines": str(out),
    }
    if args.model == "shapes":
        from tokprune.yardstick.checker import score
        from tokprune.yardstick.dataset import sample_spec

        specs = [sample_spec(i, 1) for i in range(len(shown))]
        for name, imgs in (("dense", dense), ("ort_dense", ort_dense), ("pruned", pruned)):
            result[f"accuracy_{name}"] = float(score([img for img in imgs], specs)["mean"])
    grid([("dense", dense), (f"pruned\nb={args.budget:g}", pruned)], shown, args.report / "grid.png")
    text = table(result)
    from tokprune.fsutil import atomic_write_text

    atomic_write_text(args.report / "speed.md", text + "\n")
    print(text)
    print(f"\ngrid: {args.report / 'grid.png'}   engines: {out}   (tokprune-inspect {out} --verify)")
    return result


def _counted_fraction(engines: Any) -> float:
    """MAC fraction of the runtime's plan, counting what runs (the text-importance probe included)."""
    from tokprune.pruning.macs import mac_fraction

    return mac_fraction(engines.manifest.geometry, engines.plan, engines.manifest.reuse)


def _precheck(args: argparse.Namespace) -> None:
    """Flags and output places, checked before the model loads (nothing is written by a refusal)."""
    from tokprune.errors import ConfigError
    from tokprune.export.outdir import check_replaceable, resolve_out
    from tokprune.fsutil import check_output_dir

    if not 0.0 < args.budget <= 1.0:
        raise ConfigError(f"--budget {args.budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5")
    for flag, value, low in (("--steps", args.steps, 2), ("--n", args.n, 1), ("--calib-prompts", args.calib_prompts, 1),
                             ("--holdout-prompts", args.holdout_prompts, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value}; expected an int >= {low}")
    check_output_dir(args.report, flag="--report")
    if args.engines is not None:
        engines = resolve_out(args.engines)
        check_output_dir(engines, flag="--engines")
        check_replaceable(engines, force=True, flag="--engines")  # a non-export directory: refused, --force or not


def _made_by_demo(out: Path, command: str) -> bool:
    """True when ``out`` is absent, empty, or an export a demo wrote with this ``command`` (the demo replaces
    its own exports only; any other export needs --force)."""
    import json

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("command") == command
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-demo``: 0 ok, 1 failure, 2 bad input, 130 interrupted."""
    from tokprune.console import run_cli

    return run_cli(_parser(), argv, lambda args: (run(args), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
