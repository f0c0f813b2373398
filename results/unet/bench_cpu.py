"""CPU benchmark of the U-Net family on ``sd15-medium`` (random weights: speed only, never quality).

One process, one model, same prompt / seed / step count for every row:

- eager dense (diffusers, no hook);
- DaTo token pruning only; DeepCache step caching only; DaTo + DeepCache (MAC fraction ~0.5);
- ToMe for SD (``tomesd.apply_patch(pipe, ratio=0.5)``, its defaults) on the same model;
- diffusers' Pyramid Attention Broadcast hook on the U-Net's attention modules (``UNet2DConditionModel``
  has no ``enable_cache``; PAB's hook is model-agnostic for diffusers ``Attention`` layers, so it is the one
  diffusers cache that runs on a U-Net);
- per step kind (one U-Net call): measured time vs the MAC counter's prediction.

Run (about 4-6 minutes on a shared 2-core CPU)::

    OMP_NUM_THREADS=2 .venv/bin/python results/unet/bench_cpu.py --steps 10 --reps 2 --out results/unet
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _timed(fn, reps: int) -> list[float]:
    return _timed_out(fn, reps)[0]


def _timed_out(fn, reps: int) -> tuple[list[float], object]:
    """Seconds of each of ``reps`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--out", default="results/unet")
    args = ap.parse_args()

    import tomesd
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import apply_pyramid_attention_broadcast

    from tokprune.families.unet import apply, remove
    from tokprune.families.unet.forward import unet_forward
    from tokprune.families.unet.macs import mac_fraction, step_macs
    from tokprune.families.unet.models import build_pipeline
    from tokprune.pruning.plan import ALL, PrunePlan

    torch.set_grad_enabled(False)
    pipe = build_pipeline("sd15-medium")
    steps = args.steps
    call = dict(prompt="a red circle on the left", num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                height=args.height, width=args.height)  # fmt: skip

    def run(p=pipe):
        return p(**call, generator=torch.Generator().manual_seed(0)).images

    g = None
    # geometry of this call (batch 2: CFG)
    from tokprune.families.unet.geometry import UNetGeometry

    lat = args.height // pipe.vae_scale_factor
    g = UNetGeometry.from_config(pipe.unet.config, batch=2, latent_hw=(lat, lat), text_tokens=77)
    n, w = g.num_tokens, g.windows
    alt = tuple(s > 0 and s % 2 == 0 for s in range(steps))  # D | (F, C) alternating, step 0 full
    plans = {
        "DaTo pruning (D x2, K=N/4)": PrunePlan((ALL, ALL) + (w,) * (steps - 2)),
        "DeepCache (interval 2, depth 1)": PrunePlan((ALL,) * steps, step_cache=alt),
        "DaTo + DeepCache (D, then K=N/4, interval 2)": PrunePlan((ALL,) + (w,) * (steps - 1), step_cache=alt),
    }

    rows = []
    run()  # warm-up (allocator, first-call init)
    dense_t, want = _timed_out(run, args.reps)
    rows.append({"row": "eager dense (diffusers)", "mac_fraction": 1.0, "seconds": dense_t})
    for name, plan in plans.items():
        apply(pipe, plan)
        t, got = _timed_out(run, args.reps)
        remove(pipe)
        rows.append({"row": f"eager {name}", "mac_fraction": mac_fraction(g, plan), "seconds": t,
                     "latent_rel_err": float((got - want).norm() / want.norm())})  # fmt: skip
    tomesd.apply_patch(pipe, ratio=0.5)
    t, got = _timed_out(run, args.reps)
    tomesd.remove_patch(pipe)
    rows.append({"row": "ToMe for SD (tomesd 0.1.3, ratio 0.5, defaults)", "mac_fraction": None, "seconds": t,
                 "latent_rel_err": float((got - want).norm() / want.norm())})  # fmt: skip
    pab_pipe = copy.deepcopy(pipe)
    current = {"t": 999}
    pab_pipe.unet.register_forward_pre_hook(lambda m, a, kw: current.__setitem__("t", int(a[1] if len(a) > 1 else kw["timestep"])), with_kwargs=True)
    apply_pyramid_attention_broadcast(pab_pipe.unet, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: current["t"]))  # fmt: skip
    t, got = _timed_out(lambda: run(pab_pipe), args.reps)
    rows.append({"row": "diffusers Pyramid Attention Broadcast (self-attn skip 2, t in 100..800)", "mac_fraction": None,
                 "seconds": t, "latent_rel_err": float((got - want).norm() / want.norm())})  # fmt: skip
    del pab_pipe

    # one U-Net call per step kind: time vs MAC prediction
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, lat, lat, generator=gen)
    e = torch.randn(2, 77, g.text_dim, generator=gen)
    ts = torch.tensor([500.0, 500.0])
    deep = unet_forward(pipe.unet, g, sample=x, timestep=ts, encoder_hidden_states=e).fresh["deep"]
    from tokprune.pruning.policies import make_policy

    pol = make_policy("dynamics")
    pol.reset(batch=1, grid=g.grid)
    pol.observe(torch.randn(1, n, 4, generator=gen), dense=True)
    kinds = []
    dense_call = None
    for label, keep, cached in [("full, dense", n, False), ("full, K=N/2", n // 2, False), ("full, K=N/4", w, False),
                                ("cached, dense", n, True), ("cached, K=N/4", w, True)]:  # fmt: skip
        idx = None if keep == n else pol.select(keep).expand(2, -1)
        kw = dict(sample=x, timestep=ts, encoder_hidden_states=e, img_idx=idx, caches={"deep": deep},
                  step_kind="cached" if cached else "full")  # fmt: skip
        unet_forward(pipe.unet, g, **kw)
        t = statistics.median(_timed(lambda: unet_forward(pipe.unet, g, **kw), 3))
        if dense_call is None:
            dense_call = t
        kinds.append({"step": label, "keep": keep, "mac_ratio": step_macs(g, keep, cached=cached) / step_macs(g, ALL),
                      "seconds": t, "time_ratio": t / dense_call})  # fmt: skip

    base = min(dense_t)
    for r in rows:
        r["speedup_vs_dense"] = base / min(r["seconds"])
    info = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python results/unet/bench_cpu.py "
                   f"--steps {steps} --reps {args.reps} --height {args.height} --out {args.out}",
        "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs, shared; load average at start/end {os.getloadavg()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": f"sd15-medium (random weights), {args.height}px, latent {lat}x{lat}, N={n} tokens at the pruned level, "
                 f"{steps} steps, CFG 7.5 (U-Net batch 2), 1 prompt",
    }  # fmt: skip
    import diffusers

    info["diffusers"] = diffusers.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.json").write_text(json.dumps({"info": info, "rows": rows, "step_kinds": kinds}, indent=2) + "\n")
    lines = [f"# U-Net family on CPU: {info['model']}", "", f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}; torch {info['torch']} ({info['threads']} threads), diffusers {info['diffusers']}.",
             "Random weights: times only; `latent rel. err.` is the distance to the dense run's final latent, not quality.", "",
             "| row | MAC fraction | seconds (min of reps) | vs eager dense | latent rel. err. |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        mf = "n/a" if r["mac_fraction"] is None else f"{r['mac_fraction']:.3f}"
        err = r.get("latent_rel_err")
        lines.append(f"| {r['row']} | {mf} | {min(r['seconds']):.2f} | {r['speedup_vs_dense']:.2f}x | "
                     f"{'' if err is None else f'{err:.3f}'} |")  # fmt: skip
    lines += ["", "One U-Net call per step kind (median of 3):", "",
              "| step kind | K | MAC ratio (predicted) | seconds | time ratio (measured) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for k in kinds:
        lines.append(f"| {k['step']} | {k['keep']} | {k['mac_ratio']:.3f} | {k['seconds']:.3f} | {k['time_ratio']:.3f} |")
    (out / "bench_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
