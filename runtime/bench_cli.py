"""``tokprune-bench``: PyTorch eager vs torch.compile vs ONNX Runtime vs TensorRT, dense and pruned.

Example::

    tokprune-bench --engines engines/sd3-tiny-64x64-s8-b0.5 --backends eager,onnxruntime --runs 3 \\
        --json results/bench.json --plot results/bench.png
    # a medium SD3-architecture model (random weights) for CPU speed measurements:
    tokprune-bench --make-model models/sd3-bench-medium --size medium
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tokprune.errors import ConfigError, TokpruneError

logger = logging.getLogger("tokprune.runtime")

PROG = "tokprune-bench"


def build_parser() -> argparse.ArgumentParser:
    from tokprune.runtime.bench import BACKENDS

    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Benchmark an export: PyTorch eager dense (the baseline) and pruned, torch.compile dense and pruned, "
            "ONNX Runtime dense and pruned, TensorRT dense and pruned (skipped with the reason when unavailable), "
            "on the same prompts, seeds, resolution, steps and guidance (from the export's manifest). Prints a "
            "markdown table last."
        ),
        epilog="Example: tokprune-bench --engines engines/sd3-tiny-64x64-s8-b0.5 --backends eager,onnxruntime --json bench.json",
    )
    main = p.add_argument_group("what matters")
    main.add_argument("--engines", type=Path, help="an export directory written by tokprune-export")
    main.add_argument("--backends", default="eager,compile,onnxruntime,tensorrt",
                      help=f"comma list of {','.join(BACKENDS)} (default: eager,compile,onnxruntime,tensorrt; "
                           "eager dense always runs as the baseline)")
    main.add_argument("--prompts", type=Path, help="file with one prompt per line (default: two built-in prompts)")
    main.add_argument("--runs", type=int, default=3, help="measured generations per prompt and arm (default 3)")
    main.add_argument("--json", type=Path, help="write the results as JSON here")
    main.add_argument("--plot", type=Path, help="write a PNG of speedup and fidelity per backend here")
    main.add_argument("--markdown", type=Path, help="also write the markdown tables here")
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument("--warmup", type=int, default=1, help="unmeasured generations per prompt and arm first (default 1)")
    tinker.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    tinker.add_argument("--threads", type=int,
                        help="intra-op threads of torch and ONNX Runtime alike (default: torch's default; "
                             "1 gives steadier ratios on a shared machine)")
    tinker.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    tinker.add_argument("--make-model", type=Path, metavar="DIR",
                        help="write a random-weight SD3-architecture bench model to DIR (usable as --model DIR) and exit")
    tinker.add_argument("--size", default="medium", help="size for --make-model: medium (6x384, N=1024) or large")
    tinker.add_argument("--quiet", action="store_true", help="no progress bar")
    tinker.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = f"{PROG} " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        return _run(args, command)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TokpruneError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _run(args: argparse.Namespace, command: str) -> int:
    if args.make_model is not None:
        from tokprune.runtime.bench_models import save_bench_model

        path = save_bench_model(args.make_model, args.size)
        print(f"wrote {args.size} bench model to {path}; use it as --model {path}")
        return 0
    if args.engines is None:
        raise ConfigError("--engines DIR is required (an export directory from tokprune-export)")
    from tokprune.runtime.bench import DEFAULT_PROMPTS, BenchConfig, run_bench
    from tokprune.runtime.bench_report import markdown, plot

    prompts = DEFAULT_PROMPTS
    if args.prompts is not None:
        try:
            prompts = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
        except OSError as exc:
            raise ConfigError(f"--prompts {args.prompts}: cannot read it ({exc})") from None
    cfg = BenchConfig(
        engines=args.engines,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        prompts=prompts,
        runs=args.runs,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
    )
    result = run_bench(cfg, command=command)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    text = markdown(result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Command: `{command}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
