"""ONNX Runtime buckets vs PyTorch eager on ``sd15-medium`` (random weights: speed only).

Solves a DaTo + DeepCache plan to ``--budget`` (``families/unet/schedule.budget_plan``: one dense step,
then K tokens, ``--cache-interval``), exports its three buckets (dense full step, K full step, K cached
step; each checked against PyTorch <= 1e-4 at export), then times, in one process with the same
prompt / seed / steps: eager dense (diffusers), ONNX Runtime with the dense bucket every step, eager
pruned (the plan), ONNX Runtime pruned (the plan), and one call of each bucket vs its MAC prediction.
Single-threaded (torch and ONNX Runtime) so a shared CPU perturbs both alike.

    OMP_NUM_THREADS=1 .venv/bin/python results/unet/bench_ort.py --steps 8 --budget 0.5 --cache-interval 3 --out results/unet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--cache-interval", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the ONNX files (default: a temporary folder)")
    ap.add_argument("--out", default="results/unet")
    args = ap.parse_args()

    from tokprune.families.unet import apply, get_pruner, remove
    from tokprune.families.unet.export import BucketKey, OrtRunner, export_bucket
    from tokprune.families.unet.geometry import UNetGeometry
    from tokprune.families.unet.macs import mac_fraction, step_macs
    from tokprune.families.unet.models import build_pipeline
    from tokprune.pruning.plan import ALL, PrunePlan

    torch.set_grad_enabled(False)
    pipe = build_pipeline("sd15-medium")
    lat = args.height // pipe.vae_scale_factor
    g = UNetGeometry.from_config(pipe.unet.config, batch=2, latent_hw=(lat, lat), text_tokens=77)
    n, w, steps = g.num_tokens, g.windows, args.steps
    from tokprune.families.unet.schedule import budget_plan

    plan = budget_plan(g, steps=steps, budget=args.budget, cache_interval=args.cache_interval)
    k = plan.image_keep[-1]
    keys = [BucketKey(n), BucketKey(k), BucketKey(k, cached=True)]
    work = Path(args.work or tempfile.mkdtemp(prefix="tokprune-unet-onnx-"))
    export = {}
    for key in keys:
        t0 = time.perf_counter()
        err = export_bucket(pipe.unet, g, key, work / f"{key.name}.onnx")
        export[key.name] = {"max_abs_diff_vs_pytorch": err, "export_seconds": time.perf_counter() - t0}
    runner = OrtRunner({k: work / f"{k.name}.onnx" for k in keys}, threads=1)

    call = dict(prompt="a red circle on the left", num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                height=args.height, width=args.height)  # fmt: skip

    def run():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    rows = []

    def row(name, frac, setup=None):
        if setup is not None:
            setup()
        t, out = _time(run, args.reps)
        remove(pipe)
        rows.append({"row": name, "mac_fraction": frac, "seconds": t})
        return out

    run()  # warm-up
    want = row("PyTorch eager dense (diffusers)", 1.0)

    def ort_dense():
        apply(pipe, PrunePlan.dense(steps))
        get_pruner(pipe).executor = runner

    dense_ort = row("ONNX Runtime, dense bucket every step", 1.0, ort_dense)
    label = f"DaTo K={k} + DeepCache interval {args.cache_interval} (budget {args.budget:g})"
    eager = row(f"PyTorch eager, {label}", mac_fraction(g, plan), lambda: apply(pipe, plan))

    def ort_plan():
        apply(pipe, plan)
        get_pruner(pipe).executor = runner

    ort_out = row(f"ONNX Runtime, {label}", mac_fraction(g, plan), ort_plan)
    base = min(rows[0]["seconds"])
    for r in rows:
        r["speedup_vs_eager_dense"] = base / min(r["seconds"])
    errs = {
        "ort_dense_vs_eager_dense": float((dense_ort - want).abs().max()),
        "ort_pruned_vs_eager_pruned": float((ort_out - eager).abs().max()),
    }

    gen = torch.Generator().manual_seed(1)
    feed = dict(sample=torch.randn(2, 4, lat, lat, generator=gen), timestep=torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, 77, g.text_dim, generator=gen))  # fmt: skip
    deep = runner(pipe.unet, g, **feed).fresh["deep"]
    idx = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values] * 2)
    buckets, dense_t = [], None
    for key in keys:
        kw = dict(feed, img_idx=None if key.keep == n else idx, caches={"deep": deep}, step_kind="cached" if key.cached else "full")
        runner(pipe.unet, g, **kw)
        t = statistics.median(_time(lambda: runner(pipe.unet, g, **kw), 3)[0])
        dense_t = dense_t or t
        pred = step_macs(g, key.keep, cached=key.cached) / step_macs(g, ALL)
        buckets.append({"bucket": key.name, "mac_ratio": pred, "seconds": t, "time_ratio": t / dense_t,
                        "vs_prediction": (t / dense_t) / pred - 1.0})  # fmt: skip

    import diffusers
    import onnxruntime

    info = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python results/unet/bench_ort.py "
                   f"--steps {steps} --reps {args.reps} --height {args.height} --budget {args.budget:g} "
                   f"--cache-interval {args.cache_interval} --out {args.out}",
        "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs, shared; load average at end {os.getloadavg()}",
        "versions": f"torch {torch.__version__} ({torch.get_num_threads()} thread), onnxruntime {onnxruntime.__version__} "
                    f"(1 intra-op thread), diffusers {diffusers.__version__}",
        "model": f"sd15-medium (random weights), {args.height}px, latent {lat}x{lat}, N={n}, {steps} steps, CFG 7.5 (batch 2)",
        "plan": f"image_keep={plan.image_keep}, step_cache={plan.step_cache}",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ort.json").write_text(json.dumps({"info": info, "export": export, "rows": rows, "errors": errs,
                                                     "buckets": buckets}, indent=2) + "\n")  # fmt: skip
    lines = [f"# U-Net family: ONNX Runtime buckets vs PyTorch eager ({info['model']})", "",
             f"Command: `{info['command']}`  ", f"Machine: {info['machine']}; {info['versions']}.  ",
             f"Plan: {info['plan']}. Random weights: speed only.", "",
             "| row | MAC fraction | seconds (min of reps) | vs eager dense |", "| --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['row']} | {r['mac_fraction']:.3f} | {min(r['seconds']):.2f} | {r['speedup_vs_eager_dense']:.2f}x |")
    lines += ["", f"Final latents: ONNX Runtime dense vs eager dense max |diff| {errs['ort_dense_vs_eager_dense']:.2e}; "
              f"ONNX Runtime pruned vs eager pruned {errs['ort_pruned_vs_eager_pruned']:.2e}. Export check per bucket "
              f"(ONNX Runtime vs PyTorch, max |diff|): " + ", ".join(f"{k} {v['max_abs_diff_vs_pytorch']:.1e}" for k, v in export.items()),
              "", "One call per bucket (ONNX Runtime, median of 3):", "",
              "| bucket | MAC ratio (predicted) | seconds | time ratio | vs prediction |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for b in buckets:
        lines.append(f"| {b['bucket']} | {b['mac_ratio']:.3f} | {b['seconds']:.3f} | {b['time_ratio']:.3f} | {b['vs_prediction']:+.1%} |")
    (out / "bench_ort.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
