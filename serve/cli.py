"""``tokprune-serve DIR``: serve an export over HTTP on Ray Serve (one machine or a cluster).

Locally it starts its own single-node Ray; ``--address auto`` (or ``ray://host:10001``) joins an
existing cluster, whose every node must see DIR at the same path. The directory is verified first
(the same check and messages as ``tokprune-inspect --verify``); a damaged export never starts.

Example::

    tokprune-serve engines/shapes-128x128-s8-b0.5 --replicas 2 --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "a red circle", "seed": 1}' -o circle.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tokprune.console import add_common, run_cli
from tokprune.errors import ConfigError

PROG = "tokprune-serve"
logger = logging.getLogger("tokprune.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a tokprune export on Ray Serve: POST /generate (JSON: prompt, negative_prompt, seed, guidance; "
            "steps/height/width only as the engines were built) returns a PNG, or JSON with base64 and timings "
            "with \"format\": \"json\". GET /healthz, GET /readyz. Needs the serve extra: pip install 'tokprune[serve]'."
        ),
        epilog="Example: tokprune-serve engines/shapes-128x128-s8-b0.5 --replicas 2 --port 8000\n\n"
               "SIGTERM stops the server cleanly with exit status 0; Ctrl-C stops it as cleanly, with 130.",
    )
    main = p.add_argument_group("what matters")
    main.add_argument("directory", type=Path, help="an export directory written by tokprune-export")
    main.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 to listen on all interfaces)")
    main.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    main.add_argument("--address", default=None,
                      help="join this Ray cluster ('auto', 'HOST:6379' or 'ray://HOST:10001'); default: start a local one")
    main.add_argument("--replicas", type=int, default=1, help="replicas (fixed; default 1)")
    main.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    main.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0; > 0 runs on cuda)")
    scale = p.add_argument_group("scaling and batching")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    scale.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    scale.add_argument("--target-ongoing-requests", type=float, default=2.0, help="autoscaling target per replica")
    scale.add_argument("--max-ongoing-requests", type=int, default=16, help="requests a replica accepts at once (default 16)")
    scale.add_argument("--max-batch-size", type=int, default=None,
                       help="images per pipeline call (Ray Serve batching; default: the engines' batch)")
    scale.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    scale.add_argument("--slots", type=int, default=1, help="pipeline runs in flight per replica (default 1)")
    tinker = p.add_argument_group("to tinker with")
    tinker.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), tensorrt or torch")
    tinker.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --num-gpus, else cpu)")
    tinker.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per replica")
    tinker.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt accepted (default 2000)")
    return add_common(p)


def preflight(directory: Path) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` as ``tokprune-inspect --verify`` reports them for ``directory`` (no problems: servable)."""
    from tokprune.export import manifest as manifest_module

    manifest_module.load_manifest(directory)  # raises ManifestError (missing / invalid manifest), as tokprune-inspect does
    report = getattr(manifest_module, "verify_report", None)
    if report is not None:
        problems, notes = report(directory)
        return list(problems), list(notes)
    return list(manifest_module.verify(directory)), []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-serve`` (through the shared CLI runner); returns the exit status:
    0 stopped by SIGTERM, 1 failure, 2 bad input, 130 stopped by Ctrl-C."""
    return run_cli(build_parser(), argv, _serve_until_stopped, interrupted_hint="the server stopped cleanly")


class _Stopped(BaseException):
    """SIGTERM arrived: the normal way a process manager stops a server (exit 0)."""


def _serve_until_stopped(args: argparse.Namespace) -> int:
    _stop_on_signals()
    try:
        return _serve(args)
    except _Stopped:
        print(f"{PROG}: stopped", file=sys.stderr)
        return 0


def _stop_on_signals() -> None:
    """SIGTERM stops the server cleanly (exit 0); SIGINT (Ctrl-C, even in a background job that ignores it)
    too, reported as interrupted (130)."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig, handler in ((signal.SIGINT, interrupt), (signal.SIGTERM, stop)):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (tests)
            pass


def _serve(args: argparse.Namespace) -> int:
    from tokprune.serve.deployment import ServeOptions, build_app
    from tokprune.serve.request import Limits

    directory = args.directory.resolve()
    problems, notes = preflight(directory)
    for note in notes:
        print(f"note: {note}")
    if problems:
        for line in problems:
            print(f"{PROG}: {line}", file=sys.stderr)
        print(f"{PROG}: {len(problems)} problem(s); re-export with tokprune-export ... --force", file=sys.stderr)
        return 1
    opts = ServeOptions(
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        max_ongoing_requests=args.max_ongoing_requests, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, slots=args.slots, backend=args.backend, device=args.device,
        threads=args.threads, max_prompt_chars=args.max_prompt_chars,
    )
    opts.check()
    from tokprune.export.manifest import load_manifest

    limits = Limits.from_manifest(load_manifest(directory))
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ConfigError(f"tokprune-serve needs Ray Serve ({exc}); install it with: pip install 'tokprune[serve]'") from None
    t0 = time.perf_counter()
    local = args.address is None
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING,
             **({"num_cpus": max(2, int(args.num_cpus * max(args.replicas, args.max_replicas or 0)) + 1)} if local else {}))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(directory, opts, images_per_call=limits.images_per_call)
        serve.run(app, name="tokprune", route_prefix="/", blocking=False)
        n = f"{opts.min_replicas or 1}..{opts.max_replicas}" if opts.max_replicas else str(opts.replicas)
        print(
            f"{PROG}: serving {directory} ({limits.width}x{limits.height}, {limits.steps} steps) with {n} replica(s) at "
            f"http://{args.host}:{args.port}/generate, ready in {time.perf_counter() - t0:.1f} s; Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(1.0)
    finally:
        try:
            serve.delete("tokprune")
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
