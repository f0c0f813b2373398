#!/usr/bin/env python
"""ONNX Runtime on CPU: one dynamic-K graph vs one static graph per bucket (the runtime's CPU default).

    OMP_NUM_THREADS=1 python results/gpu/layout_cpu.py --out /tmp/layout-cpu     # ~2-3 min on 2 cores

A medium SD3 architecture with random weights (6 blocks, hidden 384, N = 1024 image tokens,
T = 109 text tokens, batch 2), buckets K = 1024 / 512 / 256, fp32. Exports the three static bucket
graphs and the one dynamic graph, then times each bucket in ONNX Runtime (median of --repeats runs,
``--threads`` intra-op threads) through the runtime's runner, both layouts, and reports the
process's resident memory after opening each layout's sessions. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(a, layout: str, specs, graph) -> dict:
    from tokprune.export.runners.ort import OnnxRuntimeRunner, SharedOrtSession

    before = rss_mib()
    shared = SharedOrtSession(a.out / "graph.onnx")
    runners = {s.key: (OnnxRuntimeRunner(a.out / "graph.onnx", s, threads=a.threads, graph=graph, shared=shared)
                       if layout == "single" else OnnxRuntimeRunner(a.out / f"{s.key}.onnx", s, threads=a.threads)).activate()
               for s in specs}
    rows = {"rss_mib": round(rss_mib() - before, 1), "ms": {}}
    for s in specs:
        feed = s.sample_inputs(0)
        runners[s.key].infer(feed)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            runners[s.key].infer(feed)
            times.append(time.perf_counter() - t)
        rows["ms"][s.key] = round(statistics.median(times) * 1e3, 2)
    return rows


def main(argv=None) -> int:
    import onnx
    from diffusers import SD3Transformer2DModel

    from tokprune.export.dynamic import GraphSpec, export_graph_onnx, finalize_graph_onnx
    from tokprune.export.onnx_export import export_bucket_onnx, finalize_onnx
    from tokprune.export.spec import BucketSpec
    from tokprune.pruning.geometry import Geometry
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", choices=["per-bucket", "single"], help=argparse.SUPPRESS)  # child process
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                                  num_attention_heads=6, joint_attention_dim=384, caption_projection_dim=384,
                                  pooled_projection_dim=256, out_channels=16, pos_embed_max_size=64).eval()
    g = Geometry.from_model(model, batch=2, latent_hw=(64, 64), text_tokens=109)
    specs = [BucketSpec(g, k) for k in (g.num_tokens, g.num_tokens // 2, g.num_tokens // 4)]
    graph = GraphSpec.from_buckets(specs)
    if a.measure:  # one layout in a fresh process: its resident memory is its own
        print(json.dumps(measure(a, a.measure, specs, graph)))
        return 0
    t0 = time.perf_counter()
    for s in specs:
        raw = a.out / "raw" / s.key / "model.onnx"
        export_bucket_onnx(model, s, raw)
        onnx.save_model(finalize_onnx(raw, s), str(a.out / f"{s.key}.onnx"), save_as_external_data=True,
                        location=f"{s.key}.onnx.data")
    export_graph_onnx(model, graph, a.out / "raw" / "graph" / "model.onnx")
    onnx.save_model(finalize_graph_onnx(a.out / "raw" / "graph" / "model.onnx", graph), str(a.out / "graph.onnx"),
                    save_as_external_data=True, location="graph.onnx.data")
    export_s = time.perf_counter() - t0
    result = {"geometry": {"N": g.num_tokens, "T": g.text_tokens, "batch": g.batch, "layers": g.num_layers, "dim": g.dim},
              "threads": a.threads, "repeats": a.repeats, "export_s": round(export_s, 1), "layouts": {}}
    for layout in ("per-bucket", "single"):
        cmd = [sys.executable, __file__, "--out", str(a.out), "--repeats", str(a.repeats), "--threads", str(a.threads),
               "--measure", layout]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result["layouts"][layout] = json.loads(done.stdout.strip().splitlines()[-1])
    (a.out / "layout_cpu.json").write_text(json.dumps(result, indent=1))
    print(f"\nONNX Runtime CPU, {a.threads} threads, N={g.num_tokens}, {g.num_layers} blocks, dim {g.dim}, fp32\n")
    print("| bucket | per-bucket graphs | one dynamic graph | single vs per-bucket |\n| --- | --- | --- | --- |")
    for s in specs:
        p, q = result["layouts"]["per-bucket"]["ms"][s.key], result["layouts"]["single"]["ms"][s.key]
        print(f"| {s.key} | {p:.1f} ms | {q:.1f} ms | {q / p - 1:+.1%} |")
    print(f"| sessions' resident memory | {result['layouts']['per-bucket']['rss_mib']:.0f} MiB | "
          f"{result['layouts']['single']['rss_mib']:.0f} MiB | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
