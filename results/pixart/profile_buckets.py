"""Where a bucket's time goes: ONNX Runtime's profiler per op type, every bucket of an export, one thread count.

Each bucket runs in its own session (``SessionOptions.enable_profiling``) on its sample inputs; the
kernel times of the last ``--reps`` runs are summed per op type and divided by the run count. The
table compares each op type's time in the pruned bucket with the dense bucket's time times the
bucket's MAC ratio: an op type far above its share is work the MAC count does not predict (a
full-N copy, a single-threaded kernel, a fixed per-op cost). Run it once per thread count, each
in its own process::

    OMP_NUM_THREADS=2 python results/pixart/profile_buckets.py --engines engines/pixart-medium-cat-b0.5 \\
        --threads 2 --json results/pixart/profile-2threads.json

Wall and CPU time per run (``time.process_time``, all threads) are measured without the profiler.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _session(path: Path, threads: int, spin: bool, profile_prefix: str | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:  # spin only while a run is in flight (as OnnxRuntimeRunner(spin=True) does)
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def profile_bucket(path: Path, feed: dict[str, Any], *, threads: int, reps: int, spin: bool) -> dict[str, Any]:
    """Per op type kernel milliseconds per run (profiled runs) and wall / CPU ms per run (unprofiled runs)."""
    plain = _session(path, threads, spin, None)
    plain.run(None, feed)
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        plain.run(None, feed)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    del plain
    with tempfile.TemporaryDirectory() as tmp:
        prof = _session(path, threads, spin, os.path.join(tmp, "ort"))
        prof.run(None, feed)  # warm-up: not counted
        for _ in range(reps):
            prof.run(None, feed)
        events = json.loads(Path(prof.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][1:]
    first = runs[0]["ts"] if runs else 0
    ops: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            ops[e["args"]["op_name"]] += e["dur"] / 1e3
            count[e["args"]["op_name"]] += 1
    n = max(1, len(runs))
    return {
        "wall_ms": 1e3 * statistics.median(wall),
        "cpu_ms": 1e3 * statistics.median(cpu),
        "kernel_ms": {k: v / n for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        "nodes": {k: v // n for k, v in count.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True, help="an export directory (tokprune-export / bench_cpu.py export)")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--spin", action="store_true", help="intra-op threads spin while a run is in flight")
    p.add_argument("--json")
    args = p.parse_args(argv)

    from tokprune.export.manifest import load_manifest

    manifest = load_manifest(args.engines)
    specs = manifest.bucket_specs()
    g = manifest.geometry
    buckets = {}
    for key, spec in sorted(specs.items(), key=lambda kv: -kv[1].image_keep):
        feed = {name: x.numpy() for name, x in spec.sample_inputs(0).items()}
        buckets[key] = profile_bucket(manifest.onnx_path(key), feed, threads=args.threads, reps=args.reps, spin=args.spin)
        buckets[key]["macs"] = g.step_macs(spec.image_keep, spec.text_keep)
    dense = next(iter(buckets))
    d = buckets[dense]
    for key, b in buckets.items():
        ratio = b["macs"] / d["macs"]
        b["mac_ratio"] = ratio
        b["wall_vs_prediction"] = b["wall_ms"] / (d["wall_ms"] * ratio) - 1.0
        if key == dense:
            continue
        print(f"{key} at {args.threads} thread(s): wall {b['wall_ms']:.1f} ms (cpu {b['cpu_ms']:.1f}), dense {d['wall_ms']:.1f} ms "
              f"(cpu {d['cpu_ms']:.1f}), MAC ratio {ratio:.3f}, {100 * b['wall_vs_prediction']:+.1f} % vs prediction")
        print(f"  {'op type':24s} {'nodes':>5s} {'ms':>8s} {'share':>6s} {'dense ms':>9s} {'x ratio':>8s} {'excess ms':>9s}")
        for op, ms in b["kernel_ms"].items():
            dm = d["kernel_ms"].get(op, 0.0)
            print(f"  {op:24s} {b['nodes'][op]:5d} {ms:8.2f} {100 * ms / sum(b['kernel_ms'].values()):5.1f}% {dm:9.2f} "
                  f"{dm * ratio:8.2f} {ms - dm * ratio:+9.2f}")
    result = {"engines": str(args.engines), "threads": args.threads, "reps": args.reps, "spin": args.spin,
              "dense": dense, "buckets": buckets,
              "meta": {"load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv)}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
