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

from tokprune.console import EXIT_FAILURE, add_common, run_cli
from tokprune.errors import ConfigError
from tokprune.fsutil import atomic_output, atomic_write_text, check_output_dir, check_output_file, read_text_input

logger = logging.getLogger("tokprune.bench")

PROG = "tokprune-bench"


def build_parser() -> argparse.ArgumentParser:
    from tokprune.bench.scenario import BACKENDS

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
    main.add_argument("--require-acceptance", action="store_true",
                      help="exit 1 unless the acceptance line passes (ONNX Runtime pruned >= 1.8x eager dense and "
                           "every bucket within its MAC prediction); without it the line is informational")
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument("--warmup", type=int, default=1, help="unmeasured generations per prompt and arm first (default 1)")
    tinker.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    tinker.add_argument("--threads",
                        help="intra-op threads of torch and ONNX Runtime alike (default: torch's default; "
                             "1 gives steadier ratios on a shared machine); a comma list (1,2) runs the whole grid "
                             "once per count, each in its own process (thread pools are fixed per process)")
    tinker.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)  # child of a --threads list
    tinker.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    tinker.add_argument("--make-model", type=Path, metavar="DIR",
                        help="write a random-weight SD3-architecture bench model to DIR (usable as --model DIR) and exit")
    tinker.add_argument("--size", default="medium", help="size for --make-model: medium (6x384, N=1024) or large")
    return add_common(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-bench``; returns the exit status (0 ok, 1 failure or failed
    ``--require-acceptance``, 2 bad input, 130 interrupted)."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = f"{PROG} " + " ".join(shlex.quote(a) for a in argv_list)
    return run_cli(build_parser(), argv, lambda args: _run(args, command))


def acceptance_failures(acceptance: dict) -> list[str]:
    """What the acceptance line misses (empty: it passes)."""
    if "ort_pruned_speedup" not in acceptance:
        return [f"acceptance {acceptance.get('status', 'not measured')}; include onnxruntime in --backends"]
    fails = []
    if not acceptance.get("ort_pruned_speedup_ok"):
        fails.append(f"ONNX Runtime pruned speedup {acceptance['ort_pruned_speedup']:.2f}x < "
                     f"{acceptance.get('ort_pruned_speedup_min', 1.8)}x")
    if not acceptance.get("buckets_within_tolerance", True):
        fails.append(f"a bucket call is off its MAC prediction by more than {acceptance.get('bucket_mac_tolerance_pct', 0):.0f}%")
    return fails


def _check_args(args: argparse.Namespace) -> None:
    """Everything checkable before the model loads, in flag words."""
    for flag, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value}; expected an int >= {low}")
    args.threads = _thread_counts(args.threads)
    if len(args.threads) > 1 and args.plot is not None:
        raise ConfigError(f"--plot with --threads {','.join(map(str, args.threads))}: one plot per run; pass one thread count")
    if args.json is not None:
        check_output_file(args.json, flag="--json", extensions=(".json",))
    if args.plot is not None:
        check_output_file(args.plot, flag="--plot", extensions=(".png",))
    if args.markdown is not None:
        check_output_file(args.markdown, flag="--markdown", extensions=(".md", ".markdown", ".txt"))


def _thread_counts(value: str | None) -> list[int | None]:
    """``--threads`` as a list: [None] (torch's default), [n], or several counts."""
    if value is None:
        return [None]
    try:
        counts = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--threads {value}; expected an int >= 1 or a comma list of them, e.g. 1,2")
    return counts


def _per_thread_count(args: argparse.Namespace) -> dict[int, object]:
    """The whole grid once per thread count, each in a fresh process; results by thread count."""
    from tokprune.bench.grid import BenchResult
    from tokprune.bench.harness import run_isolated

    flags = ["--engines", args.engines, "--backends", args.backends, "--runs", args.runs, "--warmup", args.warmup,
             "--seed", args.seed, "--device", args.device, "--quiet", "--emit-json"]
    if args.prompts is not None:
        flags += ["--prompts", args.prompts]
    out = {}
    for n in args.threads:
        data = run_isolated("tokprune.bench.cli", [*flags, "--threads", n], threads=n)
        out[n] = BenchResult(rows=data["rows"], buckets=data["buckets"], meta=data["meta"], acceptance=data["acceptance"])
    return out


def _run(args: argparse.Namespace, command: str) -> int:
    if args.make_model is not None:
        check_output_dir(args.make_model, flag="--make-model")
        from tokprune.bench.models import save_bench_model

        path = save_bench_model(args.make_model, args.size)
        print(f"wrote {args.size} bench model to {path}; use it as --model {path}")
        return 0
    if args.engines is None:
        raise ConfigError("--engines DIR is required (an export directory from tokprune-export)")
    _check_args(args)
    from tokprune.bench.grid import run_bench
    from tokprune.bench.report import markdown, plot
    from tokprune.bench.scenario import DEFAULT_PROMPTS, GridScenario

    prompts = DEFAULT_PROMPTS
    if args.prompts is not None:
        prompts = tuple(read_text_input(args.prompts, flag="--prompts", what="prompt"))
    if len(args.threads) > 1:
        return _report_per_thread_count(args, _per_thread_count(args), command)
    scenario = GridScenario(
        engines=args.engines,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        prompts=prompts,
        runs=args.runs,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        threads=args.threads[0],
        progress=not args.quiet,
    )
    result = run_bench(scenario, command=command)
    if args.emit_json:  # a child of a --threads list: the result as the last stdout line
        print(json.dumps(result.to_json(), allow_nan=False))
        return 0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.plot) as tmp:
            plot(result, tmp)
    text = markdown(result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, f"Command: `{command}`\n\n{text}\n")
    print(text)
    return _acceptance_exit(args, acceptance_failures(result.acceptance))


def _report_per_thread_count(args: argparse.Namespace, results: dict, command: str) -> int:
    """JSON ``{"threads": {n: result}}`` and one markdown section per thread count; acceptance over all."""
    from tokprune.bench.report import markdown

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"command": command, "threads": {str(n): r.to_json() for n, r in results.items()}}
        atomic_write_text(args.json, json.dumps(data, indent=2, allow_nan=False) + "\n")
    text = "\n\n".join(f"### {n} thread{'s' if n != 1 else ''} (own process)\n\n{markdown(r)}" for n, r in results.items())
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, f"Command: `{command}`\n\n{text}\n")
    print(text)
    return _acceptance_exit(args, [f"{n} threads: {f}" for n, r in results.items() for f in acceptance_failures(r.acceptance)])


def _acceptance_exit(args: argparse.Namespace, fails: list[str]) -> int:
    if fails and args.require_acceptance:
        logger.error("acceptance failed (--require-acceptance): %s", "; ".join(fails))
        return EXIT_FAILURE
    if fails:
        logger.info("note: acceptance not met (%s); informational only, --require-acceptance makes it exit 1",
                    "; ".join(fails))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
