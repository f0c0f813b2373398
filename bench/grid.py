"""The benchmark grid: {PyTorch eager, torch.compile, ONNX Runtime, TensorRT} x {dense, pruned}.

Every cell ("arm", :mod:`tokprune.bench.arms`) runs the same pipeline — same prompts, seeds,
resolution, steps, guidance and T5 length, all taken from the export's manifest — with only
the pipeline's denoiser swapped. The call is the family's (:class:`~tokprune.pruning.family.ModelFamily`:
which module is the denoiser, which keyword sets the text length), so any family's export runs.

Arms are interleaved round by round (warm-ups first), so slow drifts of a shared machine hit
every arm alike; speedups are ratios measured in the same run. Per arm: denoising-loop time
(first transformer call to the end of the last scheduler step) median and spread, per-step and
per-bucket medians (steps grouped by the bucket the schedule runs there; runtime arms also time
the engine call alone), end-to-end time, achieved MAC fraction, peak memory (CPU: the peak RSS
above the RSS at the start of a generation; CUDA: ``max_memory_allocated``), speedup vs eager
dense, and fidelity vs eager dense on the same prompt and seed (PSNR and SSIM of the final
images and of the final latents, :mod:`tokprune.bench.metrics`). Per pruned runtime arm, each
bucket's latency is compared with what its MAC ratio predicts from the dense bucket's latency in
the same arm. Timing, sync and memory come from :mod:`tokprune.bench.harness`.

MACs count what runs (:mod:`tokprune.pruning.macs`): a pruned arm's MAC fraction is
``mac_fraction(geometry, plan)``, which includes the text-importance probe at the plan's probe
steps; those steps run the dense bucket's ``-probe`` variant (its own row in the per-bucket table),
every other dense step, and every step of a dense arm, the plain dense bucket.

Example::

    from tokprune.bench.grid import run_bench
    from tokprune.bench.report import markdown
    from tokprune.bench.scenario import GridScenario
    result = run_bench(GridScenario(engines="engines/sd3-tiny-64x64-s8-b0.5", backends=("eager", "onnxruntime")))
    print(markdown(result))
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokprune.bench.arms import Arm, Sample, build_arms
from tokprune.bench.harness import CallTimer, PeakMemory, StepTimer, Summary, device_sync, median
from tokprune.bench.metrics import fidelity, finite
from tokprune.bench.scenario import GridScenario

logger = logging.getLogger(__name__)

__all__ = ["MAC_TOLERANCE", "BenchResult", "run_bench"]

MAC_TOLERANCE = 0.15  # a bucket's latency within 15 % of dense latency x its MAC ratio


@dataclass
class BenchResult:
    """The grid's outcome: one row per arm, per-bucket checks, run metadata and the acceptance line."""

    rows: list[dict[str, Any]]
    buckets: list[dict[str, Any]]
    meta: dict[str, Any]
    acceptance: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "buckets": self.buckets, "acceptance": self.acceptance}


def _step_end(pipe: Any, steps: int, on_last: Callable[[torch.Tensor], None]) -> dict[str, Any]:
    """The call keywords that report the latents after the last scheduler step, in the pipeline's own style
    (``callback_on_step_end`` where it has it, else the older ``callback`` of e.g. PixArt)."""
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if i == steps - 1:
                on_last(kwargs["latents"])
            return {}
        return {"callback_on_step_end": on_step_end}

    def callback(i: int, _t: Any, latents: torch.Tensor) -> None:
        if i == steps - 1:
            on_last(latents)
    return {"callback": callback, "callback_steps": 1}


def _generate(pipe: Any, prompt: str, seed: int, settings: dict[str, Any], device: torch.device, arm: Arm) -> Sample:
    """One generation, timed per denoiser call on whatever the pipeline's denoiser is now."""
    from tokprune.pruning.family import family_for

    sync = device_sync(device)
    marks: dict[str, Any] = {"loop_end": None, "latents": None}

    def on_last(latents: torch.Tensor) -> None:
        sync()
        marks["loop_end"] = time.perf_counter()
        marks["latents"] = latents.detach().float().cpu().clone()

    timer = None
    if arm.view is not None:
        timer = CallTimer(sync)
        arm.view.executor.timer = timer
    memory = PeakMemory(device)
    try:
        with StepTimer(family_for(pipe).denoiser(pipe), sync) as steps:
            memory.start()
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = pipe(
                    prompt,
                    height=settings["height"],
                    width=settings["width"],
                    num_inference_steps=settings["steps"],
                    guidance_scale=settings["guidance"],
                    **settings["call"],
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    output_type="np",
                    **_step_end(pipe, settings["steps"], on_last),
                )
            sync()
            e2e = time.perf_counter() - t0
            peak = memory.stop()
    finally:
        if arm.view is not None:
            arm.view.executor.timer = None
    return Sample(
        loop_s=marks["loop_end"] - steps.first,
        e2e_s=e2e,
        steps_s=list(steps.steps),
        calls=list(timer.calls) if timer is not None else [],
        peak_mem_bytes=peak,
        image=out.images[0],
        latents=marks["latents"],
    )


def run_bench(scenario: GridScenario, *, command: str | None = None) -> BenchResult:
    """Run the grid described in the module docstring. Returns rows ready for JSON and :func:`markdown`."""
    from tokprune.export.spec import Backend
    from tokprune.runtime.verify import verify_export

    from tokprune.models import load_pipeline
    from tokprune.pruning.family import family_for

    device = torch.device(scenario.device)
    if scenario.threads is not None:
        torch.set_num_threads(int(scenario.threads))  # torch and ONNX Runtime get the same thread count
    manifest = verify_export(Path(scenario.engines), Backend.ONNXRUNTIME)
    data = manifest.data
    g = manifest.geometry
    pipe = load_pipeline(data["model"]["ref"], device=device)
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "height": int(data["height"]),
        "width": int(data["width"]),
        "steps": int(data["steps"]),
        "guidance": float(data["guidance"]),
        "call": family_for(pipe).call_kwargs(pipe, g),  # the text length the engines were built for
    }
    arms = build_arms(scenario, pipe, manifest, device)
    reference = _interleave(scenario, pipe, settings, device, arms)
    return _result(scenario, manifest, settings, device, arms, reference, command)


def _interleave(scenario: GridScenario, pipe: Any, settings: dict[str, Any], device: torch.device,
                arms: list[Arm]) -> dict[int, Sample]:
    """Warm-up rounds, then measured rounds, each over every live arm; returns eager dense's sample per prompt."""
    from tqdm.auto import tqdm

    live = [a for a in arms if a.skip_reason is None]
    seeds = [scenario.seed + i for i in range(len(scenario.prompts))]
    rounds = ["warmup"] * scenario.warmup + ["run"] * scenario.runs
    bar = tqdm(total=len(rounds) * len(live) * len(seeds), desc="bench", unit="gen", disable=not scenario.progress)
    reference: dict[int, Sample] = {}
    try:
        for kind in rounds:
            for arm in live:
                bar.set_postfix_str(f"{kind} {arm.label}")
                if arm.install is not None:
                    arm.install(pipe)
                try:
                    for i, (prompt, seed) in enumerate(zip(scenario.prompts, seeds)):
                        sample = _generate(pipe, prompt, seed, settings, device, arm)
                        if kind == "run":
                            arm.samples.append(sample)
                            if arm.backend == "eager" and not arm.pruned and i not in reference:
                                reference[i] = sample
                        bar.update(1)
                finally:
                    if arm.uninstall is not None:
                        arm.uninstall(pipe)
    finally:
        bar.close()
        for arm in arms:
            if arm.view is not None:
                arm.view.close()
    return reference


def _row(arm: Arm, reference: dict[int, Sample], n_prompts: int, base: Arm, table: tuple[dict, dict]) -> dict[str, Any]:
    """One arm's row: loop statistics, speedups vs eager dense, MAC fraction, memory, worst-prompt fidelity."""
    loops = Summary.of([s.loop_s for s in arm.samples])
    e2e = median([s.e2e_s for s in arm.samples])
    fid: dict[str, list[float]] = {"psnr_db": [], "ssim": [], "latent_psnr_db": [], "latent_ssim": []}
    for j, s in enumerate(arm.samples[:n_prompts]):
        ref = reference[j % n_prompts]
        for k, v in fidelity(ref.image, s.image, ref.latents[0], s.latents[0]).items():
            fid[k].append(v)
    by_bucket, calls = table
    row = {"backend": arm.backend, "pruned": arm.pruned, "label": arm.label, "status": "ok", "runs": loops.n}
    row.update({k: v for k, v in loops.to_dict().items() if k != "n"})
    row.update(
        step_median_s=median([t for s in arm.samples for t in s.steps_s]),
        e2e_median_s=e2e,
        speedup=median([s.loop_s for s in base.samples]) / loops.median_s,
        e2e_speedup=median([s.e2e_s for s in base.samples]) / e2e,
        mac_fraction=arm.mac_fraction,
        peak_mem_mib=max(s.peak_mem_bytes for s in arm.samples) / 2**20,
        psnr_db=finite(min(fid["psnr_db"])),
        ssim=min(fid["ssim"]),
        latent_psnr_db=finite(min(fid["latent_psnr_db"])),
        latent_ssim=min(fid["latent_ssim"]),
        identical_to_baseline=all(math.isinf(p) for p in fid["psnr_db"]),
        bucket_step_median_s={k: median(v) for k, v in sorted(by_bucket.items())},
        bucket_call_median_s={k: median(v) for k, v in sorted(calls.items())},
    )
    return row


def _result(scenario: GridScenario, manifest: Any, settings: dict[str, Any], device: torch.device, arms: list[Arm],
            reference: dict[int, Sample], command: str | None) -> BenchResult:
    base = next(a for a in arms if a.backend == "eager" and not a.pruned)
    specs = manifest.bucket_specs()
    rows: list[dict[str, Any]] = []
    bucket_rows: list[dict[str, Any]] = []
    tables = {id(a): _tables(a) for a in arms if a.skip_reason is None}
    for arm in arms:
        if arm.skip_reason is not None:
            rows.append({"backend": arm.backend, "pruned": arm.pruned, "label": arm.label, "status": "skipped",
                         "reason": arm.skip_reason, "median_s": None, "speedup": None,
                         "mac_fraction": arm.mac_fraction, "psnr_db": None})
            continue
        rows.append(_row(arm, reference, len(scenario.prompts), base, tables[id(arm)]))
        if arm.pruned:
            dense = next((a for a in arms if a.backend == arm.backend and not a.pruned and id(a) in tables), None)
            bucket_rows.extend(_bucket_check(arm, tables[id(arm)], dense, tables.get(id(dense)), manifest.geometry,
                                             specs, manifest.reuse))
    meta = _meta(scenario, manifest, settings, device, command)
    return BenchResult(rows=rows, buckets=bucket_rows, meta=meta, acceptance=_acceptance(rows, bucket_rows))


def _tables(arm: Arm) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(step seconds by bucket key, engine-call seconds by bucket key) over an arm's measured runs."""
    by_bucket: dict[str, list[float]] = {}
    calls: dict[str, list[float]] = {}
    for s in arm.samples:
        for key, t in zip(arm.step_keys, s.steps_s):
            by_bucket.setdefault(key, []).append(t)
        for key, t in s.calls:
            calls.setdefault(key, []).append(t)
    return by_bucket, calls


def _bucket_check(arm: Arm, table: tuple[dict, dict], dense: Arm | None, dense_table: tuple[dict, dict] | None,
                  g: Any, specs: dict[str, Any], reuse: str) -> list[dict[str, Any]]:
    """Per bucket of a pruned arm: measured latency vs (dense latency x MAC ratio), same backend and run.

    The dense latency is the same backend's dense arm (interleaved with this one, the plain dense
    bucket at every step): its median step and, for runtime arms, its median engine call. MACs count
    what each call computes (:mod:`tokprune.pruning.macs`): diffusers' own forward for eager/compile
    dense (its last block keeps text queries), the plain dense bucket for a runtime's dense arm, and
    the text-importance probe for the ``-probe`` bucket (``step_macs(..., probe=True)``). Without a
    dense arm, the pruned arm's own plain dense-bucket steps are the reference.
    """
    from tokprune.pruning.macs import diffusers_dense_macs, step_macs

    def macs(key: str) -> int:
        spec = specs[key]
        return step_macs(g, spec.image_keep, spec.text_keep, reuse, probe=spec.record_text, cached=spec.cached)

    dense_key = next(k for k, s in specs.items() if s.dense and not s.prunes_text and not s.record_text)
    by_bucket, calls = table
    if dense is not None and dense_table is not None:
        if dense.view is None:  # the diffusers forward (eager, or torch.compile of it)
            ref_macs = diffusers_dense_macs(g)
        else:
            ref_macs = step_macs(g, g.num_tokens, g.text_tokens, reuse)
        ref = {"step": median(dense_table[0].get(dense_key, [])), "call": median(dense_table[1].get(dense_key, []))}
        ref_label = f"{dense.label} arm"
    else:
        ref_macs = macs(dense_key)
        ref = {"step": median(by_bucket.get(dense_key, [])), "call": median(calls.get(dense_key, []))}
        ref_label = f"{arm.label} arm, bucket {dense_key}"
    out = []
    for key in sorted({k for k in arm.step_keys if k != "reuse"}, reverse=True):
        b = specs[key]
        ratio = macs(key) / ref_macs
        entry: dict[str, Any] = {"backend": arm.backend, "bucket": key, "image_keep": b.image_keep,
                                 "text_keep": b.text_keep, "text_mass": bool(b.record_text), "cached": bool(b.cached),
                                 "mac_ratio": ratio, "steps": arm.step_keys.count(key), "reference": ref_label}
        for what, mine in (("step", by_bucket), ("call", calls)):
            measured = median(mine.get(key, []))
            if measured is None or ref[what] is None:
                continue
            predicted = ref[what] * ratio
            entry[f"{what}_median_s"] = measured
            entry[f"{what}_predicted_s"] = predicted
            entry[f"{what}_error_pct"] = 100.0 * (measured / predicted - 1.0)
        out.append(entry)
    return out


def _acceptance(rows: list[dict[str, Any]], buckets: list[dict[str, Any]]) -> dict[str, Any]:
    ort = next((r for r in rows if r["backend"] == "onnxruntime" and r["pruned"] and r.get("status") == "ok"), None)
    result: dict[str, Any] = {"ort_pruned_speedup_min": 1.8, "bucket_mac_tolerance_pct": 100 * MAC_TOLERANCE}
    if ort is None:
        result["status"] = "not measured (no onnxruntime pruned row)"
        return result
    result["ort_pruned_speedup"] = ort["speedup"]
    result["ort_pruned_speedup_ok"] = ort["speedup"] >= 1.8
    ort_buckets = [b for b in buckets if b["backend"] == "onnxruntime" and "call_error_pct" in b]
    result["bucket_call_error_pct"] = {b["bucket"]: b["call_error_pct"] for b in ort_buckets}
    result["bucket_step_error_pct"] = {b["bucket"]: b.get("step_error_pct") for b in ort_buckets}
    result["buckets_within_tolerance"] = all(abs(b["call_error_pct"]) <= 100 * MAC_TOLERANCE for b in ort_buckets)
    return result


def _meta(scenario: GridScenario, manifest: Any, settings: dict[str, Any], device: torch.device,
          command: str | None) -> dict[str, Any]:
    from tokprune.environment import environment

    g = manifest.geometry
    env = environment(device)
    return {
        "command": command,
        "engines": str(scenario.engines),
        "model": manifest.data["model"],
        "settings": {**{k: v for k, v in settings.items() if k != "call"}, **settings["call"]},
        "image_tokens": g.num_tokens,
        "text_tokens": g.text_tokens,
        "batch": g.batch,
        "layers": getattr(g, "num_layers", None),  # transformer families; None for U-Nets (no uniform width)
        "hidden": getattr(g, "dim", None),
        "schedule": manifest.data["step_buckets"],
        "budget": manifest.data["budget"],
        "prompts": list(scenario.prompts),
        "seeds": [scenario.seed + i for i in range(len(scenario.prompts))],
        "runs": scenario.runs,
        "warmup": scenario.warmup,
        "device": str(device),
        "cpu_count": env["cpus"],
        "torch_threads": env["torch_threads"],
        "load_average_at_end": env["load_average"],
        "platform": env["platform"],
        "processor": env["device_name"],
        "versions": env["versions"],
        "time_utc": env["time_utc"],
    }
