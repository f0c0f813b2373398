"""The GPU scenario: SD3-medium architecture, 1024², CFG, 28 steps, bf16, dense vs CAT-pruned, one call.

    python3 results/gpu/scenario_gpu_ready.py --out $OUT             # a GPU host (H100/H200)
    python3 results/gpu/scenario_gpu_ready.py --dry-run --out /tmp/g  # CPU: tiny model, checks the plumbing only

Rows (each a whole Euler loop; speed vs diffusers eager dense of the same run): eager dense (diffusers),
compiled dense, and per MAC budget (CAT's fixed schedule, :func:`tokprune.calibrate.baselines.cat_schedule`)
the pruned loop through the runtime's executor with PyTorch eager / compiled / CUDA-graph bucket runners;
diffusers' first-block cache at the threshold whose computed fraction is closest to the first plan's;
ONNX Runtime (one dynamic-K graph; CUDA provider with IO binding on a GPU), dense and pruned. Per bucket:
latency vs its MAC prediction (dense bucket latency x MAC ratio, :mod:`tokprune.pruning.macs`). Before
timing, the keep-all pruned loop is checked against diffusers' dense loop (relative error <= tolerance).
Every mode is guarded: a failure becomes a row with its error; ``--out/gpu_ready.json`` is rewritten
after every mode and the markdown tables (:func:`tokprune.bench.report.loop_markdown`) are printed last.
Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokprune.bench.loop import Loop
from tokprune.bench.scenario import LOOP_MODES, LoopScenario
from tokprune.environment import environment

__all__ = ["build_parser", "main", "run_scenario"]

def _schedules(loop: Loop) -> list[dict[str, Any]]:
    """One CAT schedule per budget (calibrate's baseline), its buckets' specs and MAC fraction."""
    from tokprune.calibrate.baselines import cat_schedule, derive_align
    from tokprune.export.spec import BucketSpec, Precision
    from tokprune.pruning.macs import mac_fraction

    precision = {"bf16": Precision.BF16, "fp16": Precision.FP16, "fp32": Precision.FP32}[loop.sc.dtype]
    out = []
    for budget in loop.sc.budgets:
        plan = cat_schedule(loop.g, loop.sc.steps, budget, align=derive_align(loop.g.num_tokens))
        keeps = sorted({plan.image_k(s, loop.g.num_tokens) for s in range(loop.sc.steps)} - {0}, reverse=True)
        out.append({"budget": budget, "plan": plan, "keeps": keeps, "fraction": mac_fraction(loop.g, plan),
                    "specs": [BucketSpec(loop.g, k, precision=precision) for k in keeps]})
    return out


def _fbc(loop: Loop, threshold: float) -> tuple[float, float]:
    """diffusers' first-block cache at ``threshold``: (loop seconds, fraction of blocks computed)."""
    import types

    from tokprune.families.sd3.caches import CacheSpec, cached

    sched = types.SimpleNamespace(step_index=None)
    pipe = types.SimpleNamespace(transformer=loop.model, scheduler=sched)
    ran, step = {"n": 0}, {"i": 0}
    # a submodule of the last block runs only when the block is computed (a skipped block's own hook still fires)
    hook = loop.model.transformer_blocks[-1].norm1.register_forward_hook(lambda *a: ran.__setitem__("n", ran["n"] + 1))
    call = loop.step_call(loop.model)

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sched.step_index = None if step["i"] == 0 else step["i"]  # the cache hook reads the scheduler's step
        step["i"] += 1
        return call(x, t)

    def run() -> None:
        step["i"], ran["n"] = 0, 0
        loop.euler(counted)
    try:
        with cached(pipe, CacheSpec("fbc", {"threshold": threshold}), steps=loop.sc.steps):
            secs, _ = loop.timed(run)
    finally:
        hook.remove()
    blocks, steps = len(loop.model.transformer_blocks), loop.sc.steps
    return secs, (ran["n"] + (steps - ran["n"]) / blocks) / steps


def _ort(loop: Loop, sched: dict[str, Any], out: Path, result: dict[str, Any]) -> list[tuple[str, float, float, int]]:
    """ONNX Runtime: one dynamic-K graph of ``sched``'s buckets, dense and pruned loops; session memory."""
    import onnx
    import onnxruntime as ort

    from tokprune.export.dynamic import GraphSpec, export_graph_onnx, finalize_graph_onnx
    from tokprune.export.onnx_export import cast_for_export
    from tokprune.export.runners import OnnxRuntimeRunner, SharedOrtSession
    from tokprune.pruning.plan import PrunePlan

    if loop.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu: "
                           "results/gpu/README.md, 'onnxruntime-gpu on the GPU host')")
    specs, graph = sched["specs"], GraphSpec.from_buckets(sched["specs"])
    cast_for_export(loop.model, graph.precision)
    export_graph_onnx(loop.model, graph, out / "raw" / "model.onnx")
    onnx.save_model(finalize_graph_onnx(out / "raw" / "model.onnx", graph), str(out / "graph.onnx"),
                    save_as_external_data=True, location="graph.onnx.data")

    def free() -> int:
        loop.sync()
        return torch.cuda.mem_get_info(loop.device)[0] if loop.device.type == "cuda" else 0
    before = free()
    shared = SharedOrtSession(out / "graph.onnx")
    runners = {s.key: OnnxRuntimeRunner(out / "graph.onnx", s, device=loop.device, graph=graph, shared=shared).activate()
               for s in specs}
    one = before - free()
    singles = [OnnxRuntimeRunner(out / "graph.onnx", s, device=loop.device, graph=graph).activate() for s in specs[1:]]
    result["memory"] = {"backend": "onnxruntime", "one_graph_bytes": one, "one_session_per_bucket_bytes": before - free(),
                        "buckets": len(specs)}
    for r in singles:
        r.deactivate()
    rows = []
    for name, plan, frac in (("onnxruntime dense", PrunePlan.dense(loop.sc.steps), 1.0),
                             (f"onnxruntime pruned, CAT b={sched['budget']:g}", sched["plan"], sched["fraction"])):
        rows.append((name, frac, *loop.timed(loop.pruned(plan, runners))))
    result["buckets"] += loop.bucket_rows("onnxruntime", specs, runners)
    return rows


def run_scenario(sc: LoopScenario, out: Path, *, command: str = "") -> dict[str, Any]:
    """Every mode of ``sc``; writes ``out/gpu_ready.json`` after each and returns the result."""
    from tokprune.export.runners import TorchRunner
    from tokprune.pruning.plan import PrunePlan

    out.mkdir(parents=True, exist_ok=True)
    loop = Loop(sc)
    g, device = loop.g, loop.device
    schedules = _schedules(loop)
    result: dict[str, Any] = {
        "scenario": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(sc).items()},
        "environment": environment(device), "command": command, "errors": {}, "rows": [], "buckets": [], "checks": {},
        "geometry": {"N": g.num_tokens, "T": g.text_tokens, "batch": g.batch, "layers": g.num_layers},
        "schedules": [{"budget": s["budget"], "buckets_k": s["keeps"], "mac_fraction": round(s["fraction"], 4)}
                      for s in schedules],
    }
    rows: list[tuple[str, float, float | None, int | None]] = []  # (mode, MAC fraction, seconds, peak bytes)

    def save() -> None:  # after every mode: a run cut off by a time limit keeps what it measured
        base = rows[0][2] if rows else None
        result["rows"] = [{"mode": m, "mac_fraction": round(f, 4), "loop_ms": None if s is None else round(s * 1e3, 1),
                           "speedup": None if s is None or not base else round(base / s, 3),
                           "peak_gib": None if b is None else round(b / 2**30, 3)} for m, f, s, b in rows]
        graphs = [b for b in result["buckets"] if "CUDA graphs" in b["mode"]]
        best = max((r["speedup"] or 0 for r in result["rows"] if "CUDA graphs" in r["mode"]), default=0)
        result["targets"] = {"graphs_speedup_ge_3.5x": best >= 3.5 if best else None,
                             "graph_buckets_within_10pct": all(abs(b["vs_prediction"]) <= 0.10 for b in graphs) if graphs else None}
        (out / "gpu_ready.json").write_text(json.dumps(result, indent=1))

    def guard(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others
            result["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            traceback.print_exc()
            return None
        finally:
            save()

    def runners_for(specs: Sequence[Any], **kw: Any) -> dict[str, Any]:
        return {s.key: TorchRunner(loop.model, s, device=device, **kw).activate() for s in specs}

    def row(name: str, frac: float, fn: Callable[[], tuple[float, int]]) -> None:
        secs, peak = guard(name, fn) or (None, None)
        rows.append((name, frac, secs, peak))

    with torch.inference_mode():
        ref = loop.diffusers(loop.model)

        def check() -> None:  # keep-all through the pruned path == diffusers' dense forward
            a, b = loop.pruned(PrunePlan.dense(sc.steps), runners_for(schedules[0]["specs"][:1]))().float(), ref().float()
            err = float((a - b).norm() / b.norm())
            result["checks"]["keep_all_vs_diffusers_rel_error"] = err
            if not err <= sc.tolerance:
                raise RuntimeError(f"keep-all pruned loop differs from diffusers by {err:.3g} > tolerance {sc.tolerance:g}")
        guard("correctness", check)
        row("eager dense (diffusers)", 1.0, lambda: loop.timed(ref))
        if "compiled" not in sc.skip:
            compiled = torch.compile(loop.model, dynamic=False)
            row("compiled dense", 1.0, lambda: loop.timed(loop.diffusers(compiled)))
        variants = [("pruned eager", {}), ("pruned compiled", {"compile": True}), ("pruned CUDA graphs", {"cuda_graphs": True}),
                    ("pruned compiled + CUDA graphs", {"compile": True, "cuda_graphs": True})]
        for s in schedules:
            for name, kw in variants:
                label = f"{name}, CAT b={s['budget']:g}"
                if "compile" in kw and "compiled" in sc.skip or "cuda_graphs" in kw and "graphs" in sc.skip:
                    result["errors"][label] = "not measured: --skip"
                elif "cuda_graphs" in kw and device.type != "cuda":
                    result["errors"][label] = "not measured: no CUDA device"
                else:
                    def measure(s: dict[str, Any] = s, kw: dict[str, Any] = kw, label: str = label) -> tuple[float, int]:
                        runners = runners_for(s["specs"], **kw)
                        timing = loop.timed(loop.pruned(s["plan"], runners))
                        result["buckets"].extend(loop.bucket_rows(label, s["specs"], runners))
                        return timing
                    row(label, s["fraction"], measure)
        if "fbc" not in sc.skip:
            def fbc() -> None:
                tried = {th: _fbc(loop, th) for th in sc.fbc_thresholds}
                th, (secs, frac) = min(tried.items(), key=lambda kv: abs(kv[1][1] - schedules[0]["fraction"]))
                result["fbc"] = {str(k): {"s": v[0], "fraction": v[1]} for k, v in tried.items()}
                rows.append((f"diffusers first-block cache (threshold {th:g})", frac, secs, None))
            guard("first-block cache", fbc)
        if "ort" not in sc.skip:  # last: it casts the model's norms for export
            rows.extend(guard("onnxruntime", lambda: _ort(loop, schedules[0], out, result)) or [])
    save()
    return result


def build_parser() -> argparse.ArgumentParser:
    from tokprune.console import add_common

    ap = argparse.ArgumentParser(prog="scenario_gpu_ready.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_ready.json (and the ONNX graph)")
    ap.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                    help="tiny model on the CPU, fp32, 10 steps: checks the plumbing, measures nothing")
    ap.add_argument("--steps", type=int, help="denoising steps (default 28; dry run 10)")
    ap.add_argument("--budgets", default="0.5", help="comma list of MAC budgets, one CAT schedule each (default 0.5)")
    ap.add_argument("--repeats", type=int, help="measured loops per mode (default 3; dry run 1)")
    ap.add_argument("--fbc", help="first-block cache thresholds tried (default 0.05,0.1,0.2,0.4,0.8)")
    ap.add_argument("--skip", default="", help=f"comma list of modes to skip: {','.join(LOOP_MODES)}")
    return add_common(ap)


def _run(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from tokprune.bench.report import loop_markdown

    base = LoopScenario.tiny() if a.dry_run else LoopScenario()
    changes: dict[str, Any] = {"budgets": tuple(float(b) for b in a.budgets.split(",") if b.strip()),
                               "skip": base.skip | set(filter(None, a.skip.split(",")))}
    for name, value in (("steps", a.steps), ("repeats", a.repeats)):
        if value is not None:
            changes[name] = value
    if a.fbc:
        changes["fbc_thresholds"] = tuple(float(t) for t in a.fbc.split(","))
    result = run_scenario(replace(base, **changes), a.out, command=" ".join(sys.argv))
    print(loop_markdown(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario; the markdown tables are printed last. Exit 0 (a failing mode is a row), 2 on bad flags."""
    from tokprune.console import run_cli

    return run_cli(build_parser(), argv, _run)
