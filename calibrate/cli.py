"""``tokprune-calibrate``: measure per-step token needs and freeze a keep schedule under a MAC budget.

Example::

    tokprune-calibrate --model sd3-tiny --budget 0.5 --out schedule.json
    # writes schedule.json and schedule.png (per-step keep counts and buckets); measured rollouts
    # are checkpointed in schedule.calibration/ so an interrupted run resumes where it stopped
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from tokprune.console import add_common, run_cli

logger = logging.getLogger(__name__)

PROG = "tokprune-calibrate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run the model on sample prompts, measure how much error keeping only K tokens introduces at each "
            "denoising step, and choose per-step keep counts that minimise it under a MAC budget, frozen into at "
            "most --max-buckets static shapes. Writes the schedule JSON and a PNG plot beside it."
        ),
        epilog="Example: tokprune-calibrate --model sd3-tiny --budget 0.5 --out schedule.json",
    )
    main = p.add_argument_group("what matters")
    main.add_argument(
        "--model",
        default="sd3-tiny",
        help="model name (sd3-tiny, sd3.5-tiny, sd3, ...), hub id or local pipeline dir (default: sd3-tiny)",
    )
    main.add_argument(
        "--budget",
        type=float,
        required=True,
        help="fraction of dense transformer MACs over the whole run, in (0, 1]; e.g. 0.5",
    )
    main.add_argument("--out", type=Path, required=True, help="schedule JSON to write (a .png is written beside it)")
    main.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    main.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    main.add_argument("--steps", type=int, default=28, help="denoising steps (default: 28)")
    main.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's, else 7.0)")
    main.add_argument(
        "--max-buckets", type=int, default=4, help="static shapes allowed, the dense one included (default: 4)"
    )
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="file with one prompt per line (default: the model's own set where it has one, e.g. the shapes "
             "captions, else the built-in calibration set; as tokprune-export)",
    )
    tinker.add_argument(
        "--num-prompts", type=int, default=4,
        help="calibration prompts measured, evenly spread over the set (default: 4; 0 = all)"
    )
    tinker.add_argument(
        "--policy", default=None,
        help="token selection policy: cat, dynamics or random (default: the model family's: cat; dynamics for U-Nets)"
    )
    tinker.add_argument("--seed", type=int, default=0, help="seed of the latents and the policy (default: 0)")
    tinker.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default: 4)")
    tinker.add_argument(
        "--holdout-prompts", type=int, default=2,
        help="other prompts that validate the chosen schedule (default: 2; 0 = no validation)",
    )
    tinker.add_argument(
        "--max-rollouts", type=int, default=16,
        help="candidate schedules measured at most, as whole sampling runs (default: 16)",
    )
    tinker.add_argument(
        "--no-reuse-steps", action="store_true",
        help="token pruning only: never replace a whole step by the previous prediction",
    )
    tinker.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's, else 256)")
    tinker.add_argument("--no-text-pruning", action="store_true", help="never prune text tokens")
    tinker.add_argument(
        "--reuse",
        default="noise",
        choices=("noise", "features"),
        help="how unselected tokens are filled (default: noise, as CAT)",
    )
    tinker.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    tinker.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="weights dtype (default: float32; float16/bfloat16 on GPU)",
    )
    tinker.add_argument(
        "--checkpoint-dir", type=Path, default=None,
        help="where measured rollouts are checkpointed; a re-run with the same directory reuses them "
             "(default: next to --out, e.g. schedule.calibration/)",
    )
    return add_common(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-calibrate``. Returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    return run_cli(build_parser(), argv, _run,
                   interrupted_hint="re-run the same command to resume (measured rollouts are checkpointed)")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """``--checkpoint-dir``, else ``<out without .json>.calibration`` beside ``--out``."""
    if args.checkpoint_dir is not None:
        return args.checkpoint_dir
    return args.out.with_name(args.out.stem + ".calibration")


def _run(args: argparse.Namespace) -> int:
    import torch

    from tokprune.calibrate.api import calibrate, check_inputs
    from tokprune.calibrate.plot import plot_schedule
    from tokprune.calibrate.prompts import load_prompts
    from tokprune.errors import ConfigError, ScheduleError, ShapeError
    from tokprune.fsutil import atomic_output, check_output_dir, check_output_file, read_text_input
    from tokprune.models import load_pipeline

    if args.num_prompts < 0:
        raise ConfigError(f"--num-prompts {args.num_prompts}; expected >= 1, or 0 for all")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}; expected >= 1")
    out: Path = check_output_file(args.out, flag="--out", extensions=(".json",))  # before hours of calibration
    check_output_file(out.with_suffix(".png"), flag="--out (its .png plot)", extensions=(".png",))
    ckpt = check_output_dir(checkpoint_dir(args), flag="--checkpoint-dir")
    if args.prompts is not None:
        read_text_input(args.prompts, flag="--prompts", what="prompt")  # binary / empty / a directory
    # missing / empty file -> ConfigError before loading the model; no --prompts: calibrate() takes the
    # model's own set where it has one (the shapes captions), else the built-in one, as tokprune-export does
    prompts = load_prompts(args.prompts) if args.prompts is not None else None
    if not 0.0 < args.budget <= 1.0:  # repeated in calibrate(); here so it fails before the model loads
        raise ConfigError(
            f"--budget {args.budget!r} is out of range; expected a fraction of dense MACs in (0, 1], e.g. 0.5"
        )
    pipe = load_pipeline(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    check_inputs(
        pipe,
        budget=args.budget,
        steps=args.steps,
        height=args.height,
        width=args.width,
        max_buckets=args.max_buckets,
        policy=args.policy,
        max_sequence_length=args.max_sequence_length,
        reuse=args.reuse,
    )
    made_ckpt = not ckpt.exists()
    try:
        sched = _calibrate(calibrate, pipe, prompts, args, ckpt)
    except (ConfigError, ShapeError, ScheduleError):
        if made_ckpt:  # a refusal leaves nothing behind that this run made
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    sched.save(out)
    _tidy_checkpoints(ckpt, explicit=args.checkpoint_dir is not None)
    png = out.with_suffix(".png")
    with atomic_output(png) as tmp:  # an interrupt or a full disk leaves no half-written plot
        plot_schedule(sched, tmp)
    cat = sched.stats.get("cat_reference")
    lines = [
        f"schedule   {out}  ({sched.key})",
        f"plot       {png}",
        f"budget     {sched.budget:.3f}  achieved mac_fraction {sched.mac_fraction:.4f}",
        f"warm-up    {sched.stats['warmup']} dense steps of {sched.steps}",
        f"buckets    {', '.join(b.key for b in sched.buckets)}",
        f"plan       {' '.join('R' if e == 'reuse' else e for e in sched.plan)}",
        f"error      {sched.stats['predicted_error']:.4f} on the calibration prompts"
        + (f"  (CAT's fixed schedule at {cat['mac_fraction']:.3f}: {cat['error']:.4f})" if cat else ""),
    ]
    held = sched.stats.get("holdout")
    if held:
        lines.append(f"held-out   error {held['error']:.4f}, {held['psnr_db']:.1f} dB PSNR vs dense "
                     f"({held['num_prompts']} prompts)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _calibrate(calibrate: Any, pipe: Any, prompts: Any, args: argparse.Namespace, ckpt: Path) -> Any:
    logger.info("measured rollouts are checkpointed in %s (a re-run with the same flags reuses them)", ckpt)
    return calibrate(
        pipe,
        budget=args.budget,
        steps=args.steps,
        prompts=prompts,
        height=args.height,
        width=args.width,
        guidance=args.guidance,
        max_buckets=args.max_buckets,
        policy=args.policy,
        num_prompts=args.num_prompts or None,
        seed=args.seed,
        batch_size=args.batch_size,
        holdout_prompts=args.holdout_prompts,
        max_rollouts=args.max_rollouts,
        max_sequence_length=args.max_sequence_length,
        prune_text=not args.no_text_pruning,
        reuse=args.reuse,
        model=args.model,
        allow_reuse=not args.no_reuse_steps,
        progress=not args.quiet,
        checkpoint_dir=ckpt,
    )


def _tidy_checkpoints(ckpt: Path, *, explicit: bool) -> None:
    """After success: the default checkpoint dir goes when it holds only the calibration's own files
    (the schedule now holds the result); an explicit --checkpoint-dir is the user's and stays."""
    from tokprune.calibrate import checkpoint

    own = {getattr(checkpoint, "FILE", "rollouts.jsonl")}
    if explicit or not ckpt.is_dir():
        return
    names = {p.name for p in ckpt.iterdir()}
    if names <= own:
        shutil.rmtree(ckpt, ignore_errors=True)
    else:
        logger.info("kept %s: it holds files the calibration did not write (%s)", ckpt, ", ".join(sorted(names - own)))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
