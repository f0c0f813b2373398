"""The GPU scenario's SD3-only rows (:mod:`~tokprune.bench.scenarios.gpu_ready`): diffusers' first-block cache and
ONNX Runtime (one dynamic-K graph of the schedule's buckets; the CUDA provider with IO binding on a GPU).

Example::

    from tokprune.bench.scenarios.gpu_ready_models import make_loop, scenario_for
    from tokprune.bench.scenarios.gpu_ready_sd3 import fbc_loop
    seconds, computed_fraction = fbc_loop(make_loop(scenario_for("sd3-medium", dry_run=True)), 0.1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokprune.bench.loop import Loop

__all__ = ["fbc_loop", "ort_rows"]


def fbc_loop(loop: Loop, threshold: float) -> tuple[float, float]:
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


def ort_rows(loop: Loop, sched: dict[str, Any], out: Path, result: dict[str, Any]) -> list[tuple[str, float, float, int]]:
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
