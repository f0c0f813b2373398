"""ONNX Runtime on CPU: one dynamic-K graph vs one static graph per bucket (the runtime's CPU default).

    python3 -m tokprune.bench.scenarios.layout_cpu --out /tmp/layout-cpu     # ~2-3 min on 2 cores

A medium SD3 architecture with random weights (``sd3-cpu-medium``: 6 blocks, hidden 384, N = 1024 image
tokens, T = 109 text tokens, batch 2), buckets K = 1024 / 512 / 256, fp32. Exports the three static
bucket graphs and the one dynamic graph, then times each bucket in ONNX Runtime (median of
``--repeats`` after one warm-up, ``--threads`` intra-op threads) through the runtime's runner, each
layout in its own process (:func:`tokprune.bench.harness.run_isolated`: its resident memory and
thread count are its own), and reports the resident memory its sessions add. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokprune.bench.harness import PeakMemory, device_sync, run_isolated, time_repeats
from tokprune.environment import environment

__all__ = ["main"]

LAYOUTS = ("per-bucket", "single")


def _buckets(arch: str, text_tokens: int) -> tuple[Any, list[Any], Any, Any]:
    """The model (seeded random weights), the three bucket specs K = N, N/2, N/4, the dynamic graph, the geometry."""
    from tokprune.bench.models import build_transformer
    from tokprune.export.dynamic import GraphSpec
    from tokprune.export.spec import BucketSpec
    from tokprune.pruning.geometry import Geometry

    model = build_transformer(arch)
    s = int(model.config.sample_size)
    g = Geometry.from_model(model, batch=2, latent_hw=(s, s), text_tokens=text_tokens)
    specs = [BucketSpec(g, k) for k in (g.num_tokens, g.num_tokens // 2, g.num_tokens // 4)]
    return model, specs, GraphSpec.from_buckets(specs), g


def _measure(a: argparse.Namespace) -> dict[str, Any]:
    """One layout's sessions (in this process): resident memory they add, median ms per bucket."""
    from tokprune.export.runners import OnnxRuntimeRunner, SharedOrtSession

    out, layout, repeats, threads = a.out, a.measure, a.repeats, a.threads
    _, specs, graph, _ = _buckets(a.arch, a.text_tokens)
    before = PeakMemory.status("VmRSS")
    if layout == "single":
        shared = SharedOrtSession(out / "graph.onnx")
        runners = {s.key: OnnxRuntimeRunner(out / "graph.onnx", s, threads=threads, graph=graph, shared=shared).activate()
                   for s in specs}
    else:
        runners = {s.key: OnnxRuntimeRunner(out / f"{s.key}.onnx", s, threads=threads).activate() for s in specs}
    result: dict[str, Any] = {"rss_mib": round((PeakMemory.status("VmRSS") - before) / 2**20, 1), "ms": {}}
    for s in specs:
        feed = s.sample_inputs(0)
        secs = time_repeats(lambda: runners[s.key].infer(feed), sync=device_sync("cpu"), warmup=1, repeats=repeats)
        result["ms"][s.key] = round(statistics.median(secs) * 1e3, 2)
    return result


def _export(out: Path, arch: str, text_tokens: int) -> tuple[float, Any]:
    import onnx

    from tokprune.export.dynamic import export_graph_onnx, finalize_graph_onnx
    from tokprune.export.onnx_export import export_bucket_onnx, finalize_onnx

    model, specs, graph, g = _buckets(arch, text_tokens)
    t0 = time.perf_counter()
    for s in specs:
        raw = out / "raw" / s.key / "model.onnx"
        export_bucket_onnx(model, s, raw)
        onnx.save_model(finalize_onnx(raw, s), str(out / f"{s.key}.onnx"), save_as_external_data=True,
                        location=f"{s.key}.onnx.data")
    export_graph_onnx(model, graph, out / "raw" / "graph" / "model.onnx")
    onnx.save_model(finalize_graph_onnx(out / "raw" / "graph" / "model.onnx", graph), str(out / "graph.onnx"),
                    save_as_external_data=True, location="graph.onnx.data")
    return time.perf_counter() - t0, g


def markdown(result: dict[str, Any]) -> str:
    """The layouts side by side, per bucket, then the sessions' resident memory."""
    g, per, one = result["geometry"], result["layouts"]["per-bucket"], result["layouts"]["single"]
    lines = [f"ONNX Runtime CPU, {result['threads']} threads, N={g['N']}, {g['layers']} blocks, dim {g['dim']}, fp32", "",
             "| bucket | per-bucket graphs | one dynamic graph | single vs per-bucket |", "| --- | --- | --- | --- |"]
    for key, p in per["ms"].items():
        q = one["ms"][key]
        lines.append(f"| {key} | {p:.1f} ms | {q:.1f} ms | {q / p - 1:+.1%} |")
    lines.append(f"| sessions' resident memory | {per['rss_mib']:.0f} MiB | {one['rss_mib']:.0f} MiB | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Export, measure each layout in its own process, write ``--out/layout_cpu.json``, print the table last."""
    ap = argparse.ArgumentParser(prog="python3 -m tokprune.bench.scenarios.layout_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the graphs and layout_cpu.json")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per bucket after one warm-up (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--arch", default="sd3-cpu-medium", help="transformer architecture (tokprune.bench.models; tests: tiny)")
    ap.add_argument("--text-tokens", type=int, default=109, help="text tokens T of every bucket (default 109)")
    ap.add_argument("--measure", choices=LAYOUTS, help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if a.measure:  # one layout in a fresh process
        print(json.dumps(_measure(a)))
        return 0
    export_s, g = _export(a.out, a.arch, a.text_tokens)
    result = {"geometry": {"N": g.num_tokens, "T": g.text_tokens, "batch": g.batch, "layers": g.num_layers, "dim": g.dim},
              "threads": a.threads, "repeats": a.repeats, "export_s": round(export_s, 1), "environment": environment(),
              "layouts": {layout: run_isolated("tokprune.bench.scenarios.layout_cpu",
                                               ["--out", a.out, "--repeats", a.repeats, "--threads", a.threads,
                                                "--arch", a.arch, "--text-tokens", a.text_tokens, "--measure", layout],
                                               threads=a.threads)
                          for layout in LAYOUTS}}
    (a.out / "layout_cpu.json").write_text(json.dumps(result, indent=1))
    print("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
