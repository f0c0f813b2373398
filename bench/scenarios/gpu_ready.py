"""The GPU scenario: a real transformer architecture at 1024², CFG, 28 steps, bf16, dense vs CAT-pruned, one call.

    python3 results/gpu/scenario_gpu_ready.py --out $OUT                            # SD3-medium on a GPU host
    python3 results/gpu/scenario_gpu_ready.py --model pixart-sigma-xl --out $OUT \\
        --skip graphs --time-budget 200                                              # PixArt-Σ-XL
    python3 results/gpu/scenario_gpu_ready.py --dry-run --out /tmp/g                 # CPU: tiny model, plumbing only

``--model`` (:mod:`~tokprune.bench.scenarios.gpu_ready_models`): ``sd3-medium`` or ``pixart-sigma-xl``, random
weights built from the architecture's config. Rows (each a whole Euler loop; speed vs diffusers eager dense of
the same run): eager dense (diffusers); per MAC budget (CAT's fixed schedule,
:func:`tokprune.calibrate.baselines.cat_schedule`) the pruned loop through the runtime's executor with PyTorch
eager bucket runners; the pruned loop with compiled, CUDA-graph and compiled + CUDA-graph runners; compiled dense
(the whole transformer in ``torch.compile``); SD3 only: diffusers' first-block cache at the threshold whose
computed fraction is closest to the first plan's, and ONNX Runtime (one dynamic-K graph), dense and pruned.
Per bucket: latency vs its MAC prediction (dense bucket latency x MAC ratio, :mod:`tokprune.pruning.macs`).
Loops are timed with CUDA events on a GPU (median of ``--repeats`` after one warm-up loop).

Checks, relative error vs diffusers' bf16 dense loop within the tolerance: before timing, the keep-all pruned
loop and each pruned bucket on caches the dense bucket filled from the same input; compiled dense and the
compiled keep-all pruned loop next to their rows. Every mode is guarded: a failure becomes a row with its
error, a mode that would start after ``--time-budget`` seconds is recorded as not measured. ``--out`` gets
``gpu_ready.json`` and ``gpu_ready.md`` (rewritten after every mode: a run cut off keeps what it measured)
and ``gpu_ready.log`` (progress, tracebacks); the markdown tables are printed last. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokprune.bench.loop import Loop
from tokprune.bench.scenario import LOOP_MODES, LoopScenario
from tokprune.environment import environment
from tokprune.fsutil import atomic_write_text as write_atomic

logger = logging.getLogger(__name__)

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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _same_input(loop: Loop, specs: Sequence[Any], runners: dict[str, Any]) -> dict[str, float]:
    """Each pruned bucket with caches and previous noise from the dense bucket on the same input: its noise
    must be the dense bucket's (selected rows recomputed over the cached K/V, the others reused)."""
    dense, dev = specs[0], loop.device
    feed = {n: x.to(dev) for n, x in dense.sample_inputs(0).items()}
    feed["img_idx"] = torch.arange(loop.g.num_tokens, device=dev).expand(loop.g.batch, -1).contiguous()
    ref = runners[dense.key].infer(feed)
    caches = {t.cache: ref[t.name].clone() for t in dense.outputs() if t.cache is not None}
    errs = {}
    for spec in specs[1:]:
        f = {n: feed[n] if n in feed and n != "img_idx" else x.to(dev) for n, x in spec.sample_inputs(1).items()}
        f.update({t.name: caches[t.cache] for t in spec.inputs() if t.cache is not None})
        if "prev_noise" in f:
            f["prev_noise"] = ref["noise"].clone()
        errs[f"bucket_{spec.key}_same_input_vs_dense_rel_error"] = _rel(runners[spec.key].infer(f)["noise"], ref["noise"])
    return errs


def run_scenario(sc: LoopScenario, out: Path, *, command: str = "", time_budget: float | None = None,
                 started: float | None = None, export_attention: bool = False) -> dict[str, Any]:
    """Every mode of ``sc``; rewrites ``out/gpu_ready.json`` and ``.md`` after each, logs to ``.log``; returns the result.

    ``time_budget``: seconds since ``started`` (default: now) after which the remaining modes are not started
    (each is recorded as not measured); the files are written either way. PyTorch bucket runners use torch's
    SDPA (:func:`~tokprune.bench.scenarios.gpu_ready_models.sdpa_runner`); ``export_attention``: the export's
    fp32-softmax attention instead (:class:`~tokprune.export.runners.TorchRunner` as the export checks it).
    """
    from tokprune.bench.report import loop_markdown
    from tokprune.bench.scenarios.gpu_ready_models import make_loop, sdpa_runner, unsupported
    from tokprune.export.runners import TorchRunner
    from tokprune.pruning.plan import PrunePlan

    t0 = time.monotonic() if started is None else started
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_ready.log", "a", buffering=1)  # noqa: SIM115 - closed below; line-buffered: kept if killed

    def note(msg: str) -> None:
        logger.info(msg)
        log.write(f"{time.strftime('%H:%M:%S')} +{time.monotonic() - t0:6.1f}s {msg}\n")

    note(f"start: {command or sc}")
    loop = make_loop(sc)
    g, device = loop.g, loop.device
    skip = sc.skip | unsupported(sc.arch)
    schedules = _schedules(loop)
    result: dict[str, Any] = {
        "scenario": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(sc).items()},
        "environment": environment(device), "command": command, "errors": {}, "rows": [], "buckets": [], "checks": {},
        "geometry": {"family": g.family, "N": g.num_tokens, "T": g.text_tokens, "batch": g.batch, "layers": g.num_layers,
                     "dim": g.dim, "weights_gib": round(sum(p.numel() * p.element_size() for p in loop.model.parameters()) / 2**30, 3)},
        "schedules": [{"budget": s["budget"], "buckets_k": s["keeps"], "mac_fraction": round(s["fraction"], 4)}
                      for s in schedules],
        "time_budget_s": time_budget, "bucket_attention": "export fp32-softmax" if export_attention else "torch sdpa",
    }
    runner_class = TorchRunner if export_attention else sdpa_runner()
    for mode in sorted(unsupported(sc.arch)):
        result["errors"][mode] = f"not measured: not built for {sc.arch}"
    note(f"built {sc.arch} on {device} ({result['geometry']['weights_gib']} GiB weights); schedules {result['schedules']}")
    rows: list[tuple[str, float, float | None, int | None]] = []  # (mode, MAC fraction, seconds, peak bytes)

    def save() -> None:  # after every mode: a run cut off by a time limit keeps what it measured
        base = rows[0][2] if rows else None
        result["rows"] = [{"mode": m, "mac_fraction": round(f, 4), "loop_ms": None if s is None else round(s * 1e3, 1),
                           "speedup": None if s is None or not base else round(base / s, 3),
                           "peak_gib": None if b is None else round(b / 2**30, 3)} for m, f, s, b in rows]
        compiled = next((s for m, _, s, _ in rows if m == "compiled dense" and s), None)
        for r, (_, _, s, _) in zip(result["rows"], rows):
            r["vs_compiled_dense"] = None if s is None or compiled is None else round(compiled / s, 3)
        graphs = [b for b in result["buckets"] if "CUDA graphs" in b["mode"]]
        best = max((r["speedup"] or 0 for r in result["rows"] if "CUDA graphs" in r["mode"]), default=0)
        result["targets"] = {"graphs_speedup_ge_3.5x": best >= 3.5 if best else None,
                             "graph_buckets_within_10pct": all(abs(b["vs_prediction"]) <= 0.10 for b in graphs) if graphs else None}
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_atomic(out / "gpu_ready.json", json.dumps(result, indent=1))
        write_atomic(out / "gpu_ready.md", loop_markdown(result) + "\n")

    def guard(name: str, fn: Callable[[], Any]) -> Any:
        spent = time.monotonic() - t0
        if time_budget is not None and spent > time_budget:
            result["errors"][name] = f"not measured: --time-budget {time_budget:g} s spent ({spent:.0f} s elapsed)"
            note(f"{name}: skipped, {result['errors'][name]}")
            save()
            return None
        note(f"{name}: begins")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others
            result["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            log.write(traceback.format_exc())
            logger.error("%s failed: %s", name, result["errors"][name])
            return None
        finally:
            save()

    def runners_for(specs: Sequence[Any], **kw: Any) -> dict[str, Any]:
        return {s.key: runner_class(loop.model, s, device=device, **kw).activate() for s in specs}

    def row(name: str, frac: float, fn: Callable[[], tuple[float, int]]) -> None:
        secs, peak = guard(name, fn) or (None, None)
        if secs is not None or name not in result["errors"] or not result["errors"][name].startswith("not measured"):
            rows.append((name, frac, secs, peak))
            note(f"{name}: {'failed' if secs is None else f'{secs * 1e3:.1f} ms per loop, peak +{peak / 2**30:.2f} GiB'}")

    def check(name: str, err: float) -> None:  # a relative error, refused above the scenario's tolerance
        result["checks"][name] = err
        note(f"check {name}: {err:.3g}")
        if not err <= sc.tolerance:
            raise RuntimeError(f"{name} = {err:.3g} > tolerance {sc.tolerance:g}")

    try:
        with torch.inference_mode():
            ref = loop.diffusers(loop.model)
            want = guard("reference", ref)  # diffusers' eager dense loop: what every check compares with

            def checks() -> None:  # keep-all through the pruned path == diffusers' dense forward; buckets on cached K/V
                specs = schedules[0]["specs"]
                runners = runners_for(specs)
                check("keep_all_vs_diffusers_rel_error", _rel(loop.pruned(PrunePlan.dense(sc.steps), runners)(), want))
                for name, err in _same_input(loop, specs, runners).items():
                    check(name, err)
            guard("correctness", checks)
            row("eager dense (diffusers)", 1.0, lambda: loop.timed(ref))
            _pruned_rows(loop, schedules, skip, result, row, runners_for, "pruned eager", {})
            for name, kw in (("pruned compiled", {"compile": True}), ("pruned CUDA graphs", {"cuda_graphs": True}),
                             ("pruned compiled + CUDA graphs", {"compile": True, "cuda_graphs": True})):
                _pruned_rows(loop, schedules, skip, result, row, runners_for, name, kw, check=lambda run: guard(
                    "compiled pruned check", lambda: check("compiled_keep_all_vs_diffusers_rel_error", _rel(run(), want))))
            # compiled dense after the compiled pruned row: if --time-budget runs out, the headline row is measured
            if "compiled" in skip:
                result["errors"]["compiled dense"] = "not measured: --skip"
            else:
                compiled = torch.compile(loop.model, dynamic=False)

                def compiled_dense() -> tuple[float, int]:
                    timing = loop.timed(loop.diffusers(compiled))
                    guard("compiled dense check", lambda: check("compiled_dense_vs_eager_dense_rel_error",
                                                                _rel(loop.diffusers(compiled)(), want)))
                    return timing
                row("compiled dense", 1.0, compiled_dense)
            if "fbc" not in skip:
                from tokprune.bench.scenarios.gpu_ready_sd3 import fbc_loop

                def fbc() -> None:
                    tried = {th: fbc_loop(loop, th) for th in sc.fbc_thresholds}
                    th, (secs, frac) = min(tried.items(), key=lambda kv: abs(kv[1][1] - schedules[0]["fraction"]))
                    result["fbc"] = {str(k): {"s": v[0], "fraction": v[1]} for k, v in tried.items()}
                    rows.append((f"diffusers first-block cache (threshold {th:g})", frac, secs, None))
                guard("first-block cache", fbc)
            if "ort" not in skip:  # last: it casts the model's norms for export
                from tokprune.bench.scenarios.gpu_ready_sd3 import ort_rows

                rows.extend(guard("onnxruntime", lambda: ort_rows(loop, schedules[0], out, result)) or [])
        save()
        note(f"done in {time.monotonic() - t0:.0f} s")
    finally:
        log.close()
    return result


def _pruned_rows(loop: Loop, schedules: list[dict[str, Any]], skip: frozenset[str], result: dict[str, Any],
                 row: Callable[..., None], runners_for: Callable[..., dict[str, Any]], name: str, kw: dict[str, Any],
                 check: Callable[[Callable[[], torch.Tensor]], None] | None = None) -> None:
    """One row per schedule of the pruned loop over bucket runners made with ``kw``, and its buckets' rows."""
    from tokprune.pruning.plan import PrunePlan

    for s in schedules:
        label = f"{name}, CAT b={s['budget']:g}"
        if "compile" in kw and "compiled" in skip or "cuda_graphs" in kw and "graphs" in skip:
            result["errors"][label] = "not measured: --skip"
        elif "cuda_graphs" in kw and loop.device.type != "cuda":
            result["errors"][label] = "not measured: no CUDA device"
        else:
            def measure(s: dict[str, Any] = s, label: str = label) -> tuple[float, int]:
                runners = runners_for(s["specs"], **kw)
                if check is not None and kw == {"compile": True} and s is schedules[0]:  # keep-all, compiled dense bucket
                    check(loop.pruned(PrunePlan.dense(loop.sc.steps), {s["specs"][0].key: runners[s["specs"][0].key]}))
                timing = loop.timed(loop.pruned(s["plan"], runners))
                result["buckets"].extend(loop.bucket_rows(label, s["specs"], runners))
                return timing
            row(label, s["fraction"], measure)


def build_parser() -> argparse.ArgumentParser:
    from tokprune.bench.scenarios.gpu_ready_models import MODELS
    from tokprune.console import add_common

    ap = argparse.ArgumentParser(prog="scenario_gpu_ready.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_ready.json / .md / .log (and the ONNX graph)")
    ap.add_argument("--model", default="sd3-medium", choices=sorted(MODELS), help="transformer architecture (default sd3-medium)")
    ap.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                    help="the model's tiny twin on the CPU, fp32, 10 steps: checks the plumbing, measures nothing")
    ap.add_argument("--steps", type=int, help="denoising steps (default 28; SD3's dry run 10)")
    ap.add_argument("--budgets", default="0.5", help="comma list of MAC budgets, one CAT schedule each (default 0.5)")
    ap.add_argument("--repeats", type=int, help="measured loops per mode (default 3; dry run 1)")
    ap.add_argument("--fbc", help="first-block cache thresholds tried (default 0.05,0.1,0.2,0.4,0.8)")
    ap.add_argument("--skip", default="", help=f"comma list of modes to skip: {','.join(LOOP_MODES)}")
    ap.add_argument("--export-attention", action="store_true",
                    help="bucket runners use the export's fp32-softmax attention (default: torch's SDPA, as diffusers)")
    ap.add_argument("--time-budget", type=float, metavar="S",
                    help="seconds since the start after which remaining modes are not started (files are still written)")
    return add_common(ap)


def _run(a: argparse.Namespace, started: float) -> int:
    from tokprune.bench.report import loop_markdown
    from tokprune.bench.scenarios.gpu_ready_models import scenario_for
    from tokprune.errors import ConfigError

    if a.time_budget is not None and not a.time_budget > 0:
        raise ConfigError(f"--time-budget {a.time_budget:g}; expected seconds > 0, e.g. --time-budget 200")
    base = scenario_for(a.model, dry_run=a.dry_run)
    changes: dict[str, Any] = {"budgets": tuple(float(b) for b in a.budgets.split(",") if b.strip()),
                               "skip": base.skip | set(filter(None, a.skip.split(",")))}
    for name, value in (("steps", a.steps), ("repeats", a.repeats)):
        if value is not None:
            changes[name] = value
    if a.fbc:
        changes["fbc_thresholds"] = tuple(float(t) for t in a.fbc.split(","))
    result = run_scenario(scenario_for(a.model, dry_run=a.dry_run, **changes), a.out, command=" ".join(sys.argv),
                          time_budget=a.time_budget, started=started, export_attention=a.export_attention)
    print(loop_markdown(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario; the markdown tables are printed last. Exit 0 (a failing mode is a row), 2 on bad flags."""
    from tokprune.console import run_cli

    started = time.monotonic()
    return run_cli(build_parser(), argv, lambda a: _run(a, started))
