"""The benchmark grid: {PyTorch eager, torch.compile, ONNX Runtime, TensorRT} x {dense, pruned}.

Every cell ("arm") runs the same pipeline — same prompts, seeds, resolution, steps, guidance
and T5 length, all taken from the export's manifest — with only ``pipe.transformer`` swapped:

============== ===================================================================================
backend        dense / pruned
============== ===================================================================================
eager          diffusers' own forward (the baseline) / ``tokprune.pruning.apply`` (the eager sampler)
compile        ``torch.compile`` of the transformer / the runtime's ``torch`` backend with
               ``compile=True`` (each bucket graph compiled)
onnxruntime    the runtime with the dense bucket at every step / the runtime with the schedule
tensorrt       as onnxruntime, with the built engines (skipped with the reason when unavailable)
torch          (optional) the runtime's eager PyTorch reference backend
============== ===================================================================================

Arms are interleaved round by round (warm-ups first), so slow drifts of a shared machine hit
every arm alike; speedups are ratios measured in the same run. Per arm: denoising-loop time
(first transformer call to the end of the last scheduler step) median and spread, per-step and
per-bucket medians (steps grouped by the bucket the schedule runs there; runtime arms also time
the engine call alone), end-to-end time, achieved MAC fraction, peak memory (CPU: the peak RSS
above the RSS at the start of a generation; CUDA: ``max_memory_allocated``), speedup vs eager
dense, and fidelity vs eager dense on the same prompt and seed (PSNR and SSIM of the final
images and of the final latents). Per pruned runtime arm, each bucket's latency is compared
with what its MAC ratio predicts from the dense bucket's latency in the same arm.

MACs count what runs (:mod:`tokprune.pruning.macs`): a pruned arm's MAC fraction is
``mac_fraction(geometry, plan)``, which includes the text-importance probe at the plan's probe
steps; those steps run the dense bucket's ``-probe`` variant (its own row in the per-bucket table),
every other dense step, and every step of a dense arm, the plain dense bucket.

Example::

    from tokprune.runtime.bench import BenchConfig, run_bench
    from tokprune.runtime.bench_report import markdown
    result = run_bench(BenchConfig(engines="engines/sd3-tiny-64x64-s8-b0.5", backends=("eager", "onnxruntime")))
    print(markdown(result))
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokprune.runtime.bench_report import psnr, ssim

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "DEFAULT_PROMPTS", "BenchConfig", "BenchResult", "run_bench"]

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt", "torch")
DEFAULT_PROMPTS = ("a red circle on a blue background", "a photo of a small cat in the sun")
MAC_TOLERANCE = 0.15  # a bucket's latency within 15 % of dense latency x its MAC ratio


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark. Settings that define the images (size, steps, guidance) come from the manifest.

    Args that matter: ``engines`` (an export directory), ``backends`` (subset of :data:`BACKENDS`;
    eager dense always runs, it is the baseline), ``runs`` (measured repeats per prompt).
    Args to tinker with: ``warmup`` (unmeasured generations per arm; >= 1 so torch.compile and ONNX
    Runtime's first-call costs are excluded), ``prompts``, ``seed`` (prompt i uses seed + i), ``threads``
    (intra-op threads of torch and ONNX Runtime alike; default: torch's default), ``device``.
    """

    engines: str | Path
    backends: tuple[str, ...] = ("eager", "compile", "onnxruntime", "tensorrt")
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"--backends {','.join(unknown)}: unknown; expected a comma list of {','.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError(f"--runs {self.runs} / --warmup {self.warmup}; expected runs >= 1 and warmup >= 0")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("no prompts to benchmark (empty list or empty lines); pass --prompts FILE, one per line")


@dataclass
class Sample:
    """One measured generation."""

    loop_s: float
    e2e_s: float
    steps_s: list[float]
    calls: list[tuple[str, float]]  # (bucket key, engine call seconds), runtime arms only
    peak_mem_bytes: int
    image: Any  # (H, W, 3) float numpy in [0, 1]
    latents: torch.Tensor  # final latents (B, C, h, w), float32 CPU


@dataclass
class Arm:
    backend: str
    pruned: bool
    install: Callable[[Any], Any] | None = None  # pipe -> runtime view or None
    uninstall: Callable[[Any], None] | None = None
    step_keys: list[str] = field(default_factory=list)  # bucket key (or "reuse") per step
    mac_fraction: float = 1.0
    skip_reason: str | None = None
    samples: list[Sample] = field(default_factory=list)
    view: Any = None

    @property
    def label(self) -> str:
        return f"{self.backend} {'pruned' if self.pruned else 'dense'}"


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    buckets: list[dict[str, Any]]
    meta: dict[str, Any]
    acceptance: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "buckets": self.buckets, "acceptance": self.acceptance}


# ---- memory -----------------------------------------------------------------------------------------
class _PeakMemory:
    """Peak memory of one generation: CUDA allocator peak, or Linux VmHWM after resetting it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._base = 0
        self._can_reset = True

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self._can_reset = False
        self._base = self._status("VmRSS")

    def stop(self) -> int:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated() - self._base)
        if not self._can_reset:
            return 0
        return max(0, self._status("VmHWM") - self._base)

    @staticmethod
    def _status(field_name: str) -> int:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


# ---- timing -----------------------------------------------------------------------------------------
class _CallTimer:
    """``EngineExecutor.timer``: wall time of each engine call (synchronised on CUDA)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.calls: list[tuple[str, float]] = []
        self._key = ""
        self._t0 = 0.0

    def begin(self, key: str) -> None:
        self.sync()
        self._key, self._t0 = key, time.perf_counter()

    def end(self) -> None:
        self.sync()
        self.calls.append((self._key, time.perf_counter() - self._t0))


def _generate(pipe: Any, prompt: str, seed: int, settings: dict[str, Any], device: torch.device, arm: Arm) -> Sample:
    """One generation with per-step hooks on whatever ``pipe.transformer`` is now."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = pipe.transformer
    marks: dict[str, Any] = {"steps": [], "loop_start": None, "loop_end": None, "t0": 0.0, "latents": None}

    def pre_hook(_mod: Any, _args: Any, _kwargs: Any = None) -> None:
        sync()
        marks["t0"] = time.perf_counter()
        if marks["loop_start"] is None:
            marks["loop_start"] = marks["t0"]

    def post_hook(_mod: Any, _args: Any, _kwargs: Any = None, _out: Any = None) -> None:
        sync()
        marks["steps"].append(time.perf_counter() - marks["t0"])

    def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == settings["steps"] - 1:
            sync()
            marks["loop_end"] = time.perf_counter()
            marks["latents"] = kwargs["latents"].detach().float().cpu().clone()
        return {}

    h1 = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = module.register_forward_hook(post_hook, with_kwargs=True)
    timer = None
    if arm.view is not None:
        timer = _CallTimer(sync)
        arm.view.executor.timer = timer
    memory = _PeakMemory(device)
    try:
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
                max_sequence_length=settings["max_sequence_length"],
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        sync()
        e2e = time.perf_counter() - t0
        peak = memory.stop()
    finally:
        h1.remove()
        h2.remove()
        if arm.view is not None:
            arm.view.executor.timer = None
    return Sample(
        loop_s=marks["loop_end"] - marks["loop_start"],
        e2e_s=e2e,
        steps_s=list(marks["steps"]),
        calls=list(timer.calls) if timer is not None else [],
        peak_mem_bytes=peak,
        image=out.images[0],
        latents=marks["latents"],
    )


# ---- arms -------------------------------------------------------------------------------------------
def _runtime_arms(backend: str, engines: Path, device: torch.device, cfg: BenchConfig, original: Any,
                  manifest: Any) -> list[Arm]:
    from tokprune import runtime

    dense_keys = [_dense_key(manifest)] * int(manifest.data["steps"])
    step_keys = [k or "reuse" for k in manifest.data["step_buckets"]]  # probe steps name the -probe bucket
    name = {"compile": "torch"}.get(backend, backend)
    kwargs: dict[str, Any] = {}
    if name == "torch":
        kwargs = {"model": original, "compile": backend == "compile"}
    elif name == "onnxruntime":
        kwargs = {"threads": cfg.threads or torch.get_num_threads()}
    try:
        pruned_view = runtime.load(engines, backend=name, device=device, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a stated skip, not a crash
        reason = f"{type(exc).__name__}: {exc}"
        return [Arm(backend, False, skip_reason=reason), Arm(backend, True, skip_reason=reason)]
    dense_view = pruned_view.share(pruned=False)  # the plain dense bucket at every step

    def installer(view: Any) -> Callable[[Any], Any]:
        def install(pipe: Any) -> Any:
            return runtime.attach(pipe, view)

        return install

    arms = []
    for view, pruned, keys, frac in (
        (dense_view, False, dense_keys, 1.0),
        (pruned_view, True, step_keys, _plan_fraction(manifest)),
    ):
        if backend == "compile" and not pruned:
            continue  # compile dense is torch.compile of the diffusers forward (below)
        arms.append(Arm(backend, pruned, installer(view), runtime.detach, keys, frac, view=view))
    return arms


def _dense_key(manifest: Any) -> str:
    """The plain dense bucket's key (all N image and T text tokens, no probe)."""
    from tokprune.export.spec import bucket_key

    g = manifest.geometry
    return bucket_key(g.num_tokens, g.text_tokens)


def _plan_fraction(manifest: Any) -> float:
    """MAC fraction of the export's plan counting what runs (the text-importance probe included)."""
    from tokprune.pruning.macs import mac_fraction

    return mac_fraction(manifest.geometry, manifest.schedule().to_plan(), manifest.reuse)


def _build_arms(cfg: BenchConfig, pipe: Any, manifest: Any, device: torch.device) -> list[Arm]:
    from tokprune import pruning

    engines = Path(cfg.engines)
    steps = int(manifest.data["steps"])
    dense_key = _dense_key(manifest)
    step_keys = [k or "reuse" for k in manifest.data["step_buckets"]]
    original = pipe.transformer
    schedule = manifest.schedule()

    def restore(p: Any) -> None:
        pruning.remove(original)  # the original module, never a compiled wrapper (its forward is an attribute)
        p.transformer = original

    arms = [Arm("eager", False, None, restore, [dense_key] * steps, 1.0)]
    for backend in cfg.backends:
        if backend == "eager":
            def install_eager(p: Any) -> None:
                pruning.apply(p, schedule.to_plan(), policy=manifest.data.get("policy") or schedule.policy,
                              reuse=manifest.reuse)

            arms.append(Arm("eager", True, install_eager, restore, step_keys, _plan_fraction(manifest)))
        elif backend == "compile":
            compiled = torch.compile(original, dynamic=False)

            def install_compiled(p: Any, compiled: Any = compiled) -> None:
                p.transformer = compiled

            arms.append(Arm("compile", False, install_compiled, restore, [dense_key] * steps, 1.0))
            arms.extend(_runtime_arms("compile", engines, device, cfg, original, manifest))
        elif backend == "tensorrt":
            from tokprune.export import tensorrt as trt_env

            ok, why = trt_env.availability()
            if ok and not manifest.has_engines:
                ok, why = False, f"the export has no TensorRT engines (build them: tokprune-build {engines})"
            if not ok:
                arms += [Arm("tensorrt", False, skip_reason=why), Arm("tensorrt", True, skip_reason=why)]
            else:
                arms.extend(_runtime_arms("tensorrt", engines, device, cfg, original, manifest))
        else:  # onnxruntime, torch
            arms.extend(_runtime_arms(backend, engines, device, cfg, original, manifest))
    return arms


# ---- the run ------------------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def run_bench(cfg: BenchConfig, *, command: str | None = None) -> BenchResult:
    """Run the grid described in the module docstring. Returns rows ready for JSON and :func:`markdown`."""
    from tokprune.runtime.verify import verify_export

    from tokprune.models import load_pipeline

    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))  # torch and ONNX Runtime get the same thread count
    engines = Path(cfg.engines)
    manifest = verify_export(engines, _runtime_backend("onnxruntime"))
    data = manifest.data
    g = manifest.geometry
    pipe = load_pipeline(data["model"]["ref"], device=device)
    pipe.set_progress_bar_config(disable=True)
    clip_len = int(pipe.tokenizer.model_max_length)
    settings = {
        "height": int(data["height"]),
        "width": int(data["width"]),
        "steps": int(data["steps"]),
        "guidance": float(data["guidance"]),
        "max_sequence_length": g.text_tokens - clip_len,
    }
    arms = _build_arms(cfg, pipe, manifest, device)
    return _measure(cfg, pipe, manifest, settings, device, arms, command)


def _measure(cfg: BenchConfig, pipe: Any, manifest: Any, settings: dict[str, Any], device: torch.device,
             arms: list[Arm], command: str | None) -> BenchResult:
    from tqdm.auto import tqdm

    g = manifest.geometry
    live = [a for a in arms if a.skip_reason is None]
    seeds = [cfg.seed + i for i in range(len(cfg.prompts))]
    rounds = [("warmup", r) for r in range(cfg.warmup)] + [("run", r) for r in range(cfg.runs)]
    total = len(rounds) * len(live) * len(cfg.prompts)
    bar = tqdm(total=total, desc="bench", unit="gen", disable=not cfg.progress)
    reference: dict[int, Sample] = {}
    try:
        for kind, _r in rounds:
            for arm in live:
                bar.set_postfix_str(f"{kind} {arm.label}")
                if arm.install is not None:
                    arm.install(pipe)
                try:
                    for i, (prompt, seed) in enumerate(zip(cfg.prompts, seeds)):
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

    base = next(a for a in arms if a.backend == "eager" and not a.pruned)
    base_loop = _median([s.loop_s for s in base.samples])
    base_e2e = _median([s.e2e_s for s in base.samples])
    specs = manifest.bucket_specs()
    rows: list[dict[str, Any]] = []
    bucket_rows: list[dict[str, Any]] = []
    tables = {id(a): _tables(a) for a in arms if a.skip_reason is None}
    for arm in arms:
        row: dict[str, Any] = {"backend": arm.backend, "pruned": arm.pruned, "label": arm.label}
        if arm.skip_reason is not None:
            row.update(status="skipped", reason=arm.skip_reason, median_s=None, speedup=None,
                       mac_fraction=arm.mac_fraction, psnr_db=None)
            rows.append(row)
            continue
        loops = [s.loop_s for s in arm.samples]
        n_prompts = len(cfg.prompts)
        per_step = [t for s in arm.samples for t in s.steps_s]
        by_bucket, calls = tables[id(arm)]
        fid = {"psnr_db": [], "ssim": [], "latent_psnr_db": [], "latent_ssim": []}
        for j, s in enumerate(arm.samples[:n_prompts]):
            ref = reference[j % n_prompts]
            img_ref = torch.from_numpy(ref.image).permute(2, 0, 1)
            img = torch.from_numpy(s.image).permute(2, 0, 1)
            lat_ref, lat = ref.latents[0], s.latents[0]
            rng = float(lat_ref.max() - lat_ref.min()) or 1.0
            fid["psnr_db"].append(psnr(img_ref, img, 1.0))
            fid["ssim"].append(ssim(img_ref, img, 1.0))
            fid["latent_psnr_db"].append(psnr(lat_ref, lat, rng))
            fid["latent_ssim"].append(ssim(lat_ref, lat, rng))
        median_loop = _median(loops)
        row.update(
            status="ok",
            runs=len(loops),
            median_s=median_loop,
            p25_s=_quantile(loops, 0.25),
            p75_s=_quantile(loops, 0.75),
            min_s=min(loops),
            max_s=max(loops),
            spread_pct=100.0 * (_quantile(loops, 0.75) - _quantile(loops, 0.25)) / median_loop,
            step_median_s=_median(per_step),
            e2e_median_s=_median([s.e2e_s for s in arm.samples]),
            speedup=base_loop / median_loop,
            e2e_speedup=base_e2e / _median([s.e2e_s for s in arm.samples]),
            mac_fraction=arm.mac_fraction,
            peak_mem_mib=max(s.peak_mem_bytes for s in arm.samples) / 2**20,
            psnr_db=_finite(min(fid["psnr_db"])),
            ssim=min(fid["ssim"]),
            latent_psnr_db=_finite(min(fid["latent_psnr_db"])),
            latent_ssim=min(fid["latent_ssim"]),
            identical_to_baseline=all(math.isinf(p) for p in fid["psnr_db"]),
            bucket_step_median_s={k: _median(v) for k, v in sorted(by_bucket.items())},
            bucket_call_median_s={k: _median(v) for k, v in sorted(calls.items())},
        )
        rows.append(row)
        if arm.pruned:
            dense = next((a for a in arms if a.backend == arm.backend and not a.pruned and id(a) in tables), None)
            bucket_rows.extend(_bucket_check(arm, tables[id(arm)], dense, tables.get(id(dense)), g, specs, manifest.reuse))
    acceptance = _acceptance(rows, bucket_rows)
    meta = _meta(cfg, manifest, settings, device, command)
    return BenchResult(rows=rows, buckets=bucket_rows, meta=meta, acceptance=acceptance)


def _runtime_backend(name: str) -> Any:
    from tokprune.runtime.runners import RuntimeBackend

    return RuntimeBackend.parse(name)


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
        return step_macs(g, spec.image_keep, spec.text_keep, reuse, probe=spec.record_text)

    dense_key = next(k for k, s in specs.items() if s.dense and not s.prunes_text and not s.record_text)
    by_bucket, calls = table
    if dense is not None and dense_table is not None:
        if dense.view is None:  # the diffusers forward (eager, or torch.compile of it)
            ref_macs = diffusers_dense_macs(g)
        else:
            ref_macs = step_macs(g, g.num_tokens, g.text_tokens, reuse)
        ref = {"step": _median(dense_table[0].get(dense_key, [])), "call": _median(dense_table[1].get(dense_key, []))}
        ref_label = f"{dense.label} arm"
    else:
        ref_macs = macs(dense_key)
        ref = {"step": _median(by_bucket.get(dense_key, [])), "call": _median(calls.get(dense_key, []))}
        ref_label = f"{arm.label} arm, bucket {dense_key}"
    out = []
    for key in sorted({k for k in arm.step_keys if k != "reuse"}, reverse=True):
        b = specs[key]
        ratio = macs(key) / ref_macs
        entry: dict[str, Any] = {"backend": arm.backend, "bucket": key, "image_keep": b.image_keep,
                                 "text_keep": b.text_keep, "text_mass": bool(b.record_text),
                                 "mac_ratio": ratio, "steps": arm.step_keys.count(key), "reference": ref_label}
        for what, mine in (("step", by_bucket), ("call", calls)):
            measured = _median(mine.get(key, []))
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


def _meta(cfg: BenchConfig, manifest: Any, settings: dict[str, Any], device: torch.device, command: str | None) -> dict[str, Any]:
    import diffusers
    import onnxruntime

    g = manifest.geometry
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "command": command,
        "engines": str(cfg.engines),
        "model": manifest.data["model"],
        "settings": settings,
        "image_tokens": g.num_tokens,
        "text_tokens": g.text_tokens,
        "batch": g.batch,
        "layers": g.num_layers,
        "hidden": g.dim,
        "schedule": manifest.data["step_buckets"],
        "budget": manifest.data["budget"],
        "prompts": list(cfg.prompts),
        "seeds": [cfg.seed + i for i in range(len(cfg.prompts))],
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
