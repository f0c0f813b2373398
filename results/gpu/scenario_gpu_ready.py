#!/usr/bin/env python
"""GPU-ready benchmark (issue 16): SD3-medium architecture, 1024², CFG, 28 steps, bf16 — one call.

    PYTHONPATH=. python results/gpu/scenario_gpu_ready.py --out $OUT          # a GPU host (H100)
    python results/gpu/scenario_gpu_ready.py --tiny --out /tmp/gpu-ready      # CPU plumbing check only

Rows (each a whole 28-step Euler loop; speed vs diffusers eager dense of the same run):
eager dense (diffusers), compiled dense, pruned b=0.5 (CAT schedule, ``tokprune.calibrate.baselines``)
through the runtime's executor with PyTorch eager / compiled / CUDA graphs per bucket, ONNX Runtime
CUDA (one dynamic-K graph, IO binding; dense and pruned), and diffusers' first-block cache at the
threshold whose computed fraction is closest to the pruned plan's MAC fraction. Per bucket: latency
vs its MAC prediction (``tokprune.pruning.macs``: dense bucket latency x MAC ratio). Memory: ONNX
Runtime sessions of the one graph, one shared vs one per bucket (each holding the weights).
Every mode is guarded: a failure becomes a row with its error. Raw JSON is written to
``--out/gpu_ready.json`` and the markdown table is printed last. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
from tokprune.calibrate.baselines import cat_schedule, derive_align  # noqa: E402
from tokprune.export.spec import BucketSpec, Precision  # noqa: E402
from tokprune.pruning.geometry import Geometry  # noqa: E402
from tokprune.pruning.macs import dense_macs, mac_fraction, step_macs  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    from tokprune.models import build_tiny_transformer

    if tiny:
        model, text = build_tiny_transformer(), 20
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = SD3Transformer2DModel(**SD3_MEDIUM)
        text = 77 + 256
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    s = model.config.sample_size
    return model, Geometry.from_model(model, batch=2, latent_hw=(s, s), text_tokens=text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(g: Geometry, model, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c = model.config
    return {"latent": torch.randn(g.batch, g.in_channels, *g.latent_hw, generator=gen).to(device, dtype),
            "ehs": torch.randn(g.batch, g.text_tokens, c.joint_attention_dim, generator=gen).to(device, dtype),
            "pooled": torch.randn(g.batch, c.pooled_projection_dim, generator=gen).to(device, dtype)}


def euler_loop(call, inp, steps: int, device) -> None:
    """A flow-matching Euler loop: ``x += dt * call(x, t)``; ``call`` is one transformer call."""
    x = inp["latent"].clone()
    ts = torch.linspace(1000.0, 1000.0 / steps, steps)
    for s in range(steps):
        t = torch.full((x.shape[0],), float(ts[s]), device=device)
        x = x + (-1.0 / steps) * call(x, t)


def pruned_loop(model, plan, runners: dict, dtype, steps: int, device):
    """The runtime's own step loop (TokenPruner + EngineExecutor) over ``runners`` (bucket key -> runner)."""
    from tokprune.runtime.engine import EngineExecutor, _EnginePruner

    engines = types.SimpleNamespace(runners=runners, lock=threading.Lock(), manifest=None)
    pruner = _EnginePruner(torch.nn.Identity(), plan, policy="cat", reuse="noise", executor=EngineExecutor(engines),
                           config=model.config, cache_dtype=dtype, use_caches=True, guidance=7.0)

    def run(inp):
        pruner.reset()
        euler_loop(lambda x, t: pruner(x, inp["ehs"], inp["pooled"], t, return_dict=False)[0], inp, steps, device)
    return run


def bucket_rows(name, specs, runners, g, device, repeats) -> list[dict]:
    """Each bucket alone (fixed feed): latency vs dense latency x its MAC ratio."""
    rows, dense_s = [], None
    for spec in specs:  # dense first
        feed = {n: x.to(device) for n, x in spec.sample_inputs(0).items()}
        secs = timed(lambda: runners[spec.key].infer(feed), device, repeats)
        ratio = step_macs(g, spec.image_keep) / dense_macs(g)
        dense_s = secs if dense_s is None else dense_s
        pred = dense_s * ratio
        rows.append({"mode": name, "bucket": spec.key, "mac_ratio": round(ratio, 4), "ms": round(secs * 1e3, 3),
                     "predicted_ms": round(pred * 1e3, 3), "vs_prediction": round(secs / pred - 1.0, 4)})
    return rows


def fbc_fraction_run(model, inp, steps, threshold, device):
    """diffusers FirstBlockCache at ``threshold``: (loop seconds, fraction of blocks computed)."""
    from tokprune.yardstick.caches import CacheSpec, cached

    sched = types.SimpleNamespace(step_index=None)
    pipe = types.SimpleNamespace(transformer=model, scheduler=sched)
    ran = {"n": 0}
    # a submodule of the last block: it runs only when the block is computed (a skipped block's hook still fires)
    hook = model.transformer_blocks[-1].norm1.register_forward_hook(lambda *a: ran.__setitem__("n", ran["n"] + 1))
    step = {"i": 0}

    def call(x, t):
        sched.step_index = None if step["i"] == 0 else step["i"]
        step["i"] += 1
        return model(hidden_states=x, encoder_hidden_states=inp["ehs"], pooled_projections=inp["pooled"], timestep=t,
                     return_dict=False)[0]
    try:
        with cached(pipe, CacheSpec("fbc", {"threshold": threshold}), steps=steps):
            step["i"], ran["n"] = 0, 0
            sync(device)
            t0 = time.perf_counter()
            euler_loop(call, inp, steps, device)
            sync(device)
            secs = time.perf_counter() - t0
    finally:
        hook.remove()
    blocks = len(model.transformer_blocks)
    return secs, (ran["n"] + (steps - ran["n"]) / blocks) / steps


def ort_modes(model, g, specs, plan, out: Path, device, dtype, steps, inp, repeats, result):
    """ONNX Runtime (CUDA provider on a GPU, CPU in --tiny): one dynamic graph, dense and pruned; memory."""
    import onnx
    import onnxruntime as ort

    from tokprune.export.dynamic import GraphSpec, export_graph_onnx, finalize_graph_onnx
    from tokprune.export.onnx_export import cast_for_export
    from tokprune.runtime.runners import OnnxRuntimeRunner, SharedOrtSession

    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu: "
                           "results/gpu/README.md, 'onnxruntime-gpu on the GPU host')")
    graph = GraphSpec.from_buckets(specs)
    cast_for_export(model, graph.precision)
    t0 = time.perf_counter()
    export_graph_onnx(model, graph, out / "raw" / "model.onnx")
    onnx.save_model(finalize_graph_onnx(out / "raw" / "model.onnx", graph), str(out / "graph.onnx"),
                    save_as_external_data=True, location="graph.onnx.data")
    result["ort_export_s"] = round(time.perf_counter() - t0, 1)

    def free() -> int:
        sync(device)
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    before = free()
    shared = SharedOrtSession(out / "graph.onnx")
    runners = {s.key: OnnxRuntimeRunner(out / "graph.onnx", s, device=device, graph=graph, shared=shared).activate()
               for s in specs}
    one = before - free()
    singles = [OnnxRuntimeRunner(out / "graph.onnx", s, device=device, graph=graph).activate() for s in specs[1:]]
    result["memory"] = {"backend": "onnxruntime", "one_graph_bytes": one, "one_session_per_bucket_bytes": before - free(),
                        "buckets": len(specs), "note": "per bucket = one session of the graph per bucket (own weights)"}
    for r in singles:
        r.deactivate()
    dense_plan = type(plan).dense(steps)
    rows = []
    for name, p in (("onnxruntime dense", dense_plan), ("onnxruntime pruned", plan)):
        loop = pruned_loop(model, p, runners, dtype, steps, device)
        rows.append((name, p, timed(lambda: loop(inp), device, repeats)))
    result["buckets"] += bucket_rows("onnxruntime", specs, runners, g, device, repeats)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the plumbing, measures nothing")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fbc", default="0.05,0.1,0.2,0.4,0.8", help="first-block cache thresholds tried")
    ap.add_argument("--skip", default="", help="comma list of modes to skip: compiled,graphs,ort,fbc")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    if a.tiny:
        skip |= {"compiled"}  # inductor on a shared 2-core CPU takes minutes for nothing measurable
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    dtype, precision = (torch.float32, Precision.FP32) if a.tiny else (torch.bfloat16, Precision.BF16)
    a.out.mkdir(parents=True, exist_ok=True)
    from tokprune.runtime.runners import TorchRunner

    model, g = build(a.tiny, device, dtype)
    plan = cat_schedule(g, a.steps, a.budget, align=derive_align(g.num_tokens))
    keeps = sorted({plan.image_k(s, g.num_tokens) for s in range(a.steps)} - {0}, reverse=True)
    specs = [BucketSpec(g, k, precision=precision) for k in keeps]
    frac = mac_fraction(g, plan)
    inp = inputs(g, model, device, dtype)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "tiny": a.tiny, "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "geometry": {"N": g.num_tokens, "T": g.text_tokens, "batch": g.batch, "layers": g.num_layers},
              "steps": a.steps, "budget": a.budget, "mac_fraction": round(frac, 4), "buckets_k": keeps,
              "command": " ".join(sys.argv), "rows": [], "buckets": [], "errors": {}}
    rows: list[tuple[str, float, float | None]] = []  # (mode, MAC fraction, seconds or None)

    def save() -> None:  # after every mode: a run cut off by a time limit keeps what it measured
        base = rows[0][2] if rows else None
        result["rows"] = [{"mode": m, "mac_fraction": round(f, 4), "loop_ms": None if s is None else round(s * 1e3, 1),
                           "speedup": None if s is None or not base else round(base / s, 3)} for m, f, s in rows]
        graphs = [b for b in result["buckets"] if "CUDA graphs" in b["mode"]]
        best = max((r["speedup"] or 0 for r in result["rows"] if "CUDA graphs" in r["mode"]), default=None)
        result["targets"] = {"graphs_speedup_ge_3.5x": None if not best else best >= 3.5,
                             "graph_buckets_within_10pct": all(abs(b["vs_prediction"]) <= 0.10 for b in graphs) if graphs else None}
        (a.out / "gpu_ready.json").write_text(json.dumps(result, indent=1))

    def guard(name, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others
            result["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            traceback.print_exc()
            return None
        finally:
            save()

    def diffusers_call(m):
        return lambda x, t: m(hidden_states=x, encoder_hidden_states=inp["ehs"], pooled_projections=inp["pooled"],
                              timestep=t, return_dict=False)[0]
    with torch.inference_mode():
        rows.append(("eager dense (diffusers)", 1.0,
                     guard("eager dense", lambda: timed(lambda: euler_loop(diffusers_call(model), inp, a.steps, device),
                                                         device, a.repeats))))
        if "compiled" not in skip:
            compiled = torch.compile(model, dynamic=False)
            rows.append(("compiled dense", 1.0, guard("compiled dense", lambda: timed(
                lambda: euler_loop(diffusers_call(compiled), inp, a.steps, device), device, a.repeats))))
        variants = [("pruned eager", {}), ("pruned compiled", {"compile": True}), ("pruned CUDA graphs", {"cuda_graphs": True}),
                    ("pruned compiled + CUDA graphs", {"compile": True, "cuda_graphs": True})]
        for name, kw in variants:
            if ("compile" in kw and "compiled" in skip) or ("cuda_graphs" in kw and ("graphs" in skip or device.type != "cuda")):
                why = "no CUDA device" if "cuda_graphs" in kw and device.type != "cuda" else "skipped (--skip, or --tiny)"
                result["errors"][name] = "not measured: " + why
                continue

            def run(kw=kw, name=name):
                runners = {s.key: TorchRunner(model, s, device=device, **kw).activate() for s in specs}
                loop = pruned_loop(model, plan, runners, dtype, a.steps, device)
                secs = timed(lambda: loop(inp), device, a.repeats)
                result["buckets"].extend(bucket_rows(name, specs, runners, g, device, a.repeats))
                return secs
            rows.append((f"{name}, CAT b={a.budget:g}", frac, guard(name, run)))
        if "fbc" not in skip:
            def fbc():
                tried = {th: fbc_fraction_run(model, inp, a.steps, th, device) for th in map(float, a.fbc.split(","))}
                th, (secs, f) = min(tried.items(), key=lambda kv: abs(kv[1][1] - frac))
                result["fbc"] = {str(k): {"s": v[0], "fraction": v[1]} for k, v in tried.items()}
                rows.append((f"diffusers first-block cache (threshold {th:g})", f, secs))
            guard("first-block cache", fbc)
        if "ort" not in skip:  # last: it casts the model's norms for export
            for name, p, secs in guard("onnxruntime", lambda: ort_modes(model, g, specs, plan, a.out, device, dtype,
                                                                         a.steps, inp, a.repeats, result)) or []:
                rows.append((name, mac_fraction(g, p), secs))
    save()
    print(f"\n{result['device']}, N={g.num_tokens}, T={g.text_tokens}, {a.steps} steps, "
          f"{'fp32 tiny (plumbing only)' if a.tiny else 'bf16'}\n")
    print("| mode | MAC fraction | loop | vs eager dense |\n| --- | --- | --- | --- |")
    for r in result["rows"]:
        ms = "failed" if r["loop_ms"] is None else f"{r['loop_ms']:.1f} ms"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['mode']} | {r['mac_fraction']:.2f} | {ms} | {speed} |")
    print("\n| backend | bucket | MAC ratio | ms | predicted | vs prediction |\n| --- | --- | --- | --- | --- | --- |")
    for b in result["buckets"]:
        print(f"| {b['mode']} | {b['bucket']} | {b['mac_ratio']:.3f} | {b['ms']:.2f} | {b['predicted_ms']:.2f} | "
              f"{b['vs_prediction']:+.1%} |")
    if "memory" in result:
        m = result["memory"]
        print(f"\nmemory ({m['backend']}, {m['buckets']} buckets): one graph {m['one_graph_bytes'] / 2**30:.2f} GiB, "
              f"one session per bucket {m['one_session_per_bucket_bytes'] / 2**30:.2f} GiB")
    for k, v in result["errors"].items():
        print(f"- {k}: {v}")
    print(f"- targets: {result['targets']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
