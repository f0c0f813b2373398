#!/usr/bin/env python
"""SD3-medium at 1024x1024 on one GPU: dense vs CAT-pruned, eager vs torch.compile (issue 7).

One call does the whole measurement and prints a markdown table LAST:

    PYTHONPATH=. python results/gpu/bench_sd3_medium.py --out $OUT            # H100, ~6-8 min
    python results/gpu/bench_sd3_medium.py --tiny --out /tmp/bench_tiny       # CPU plumbing check, < 60 s

What it builds and measures:

- the full SD3-medium transformer architecture (diffusers ``SD3Transformer2DModel``, 24 blocks,
  24 heads x 64, ~2.0 B parameters), random weights initialised on the device, bf16;
  1024^2 -> latent 16x128x128 -> N = 4096 image tokens; T = 333 text tokens; batch 2 (CFG);
  28 flow-matching (Euler, shift 3) steps;
- modes: eager dense (diffusers forward, the baseline), eager pruned (``TokenPruner`` with the
  CAT policy: the product's eager path), compiled pruned (the pure ``pruned_forward`` compiled
  once per static bucket K through a small ``nn.Module`` wrapper), compiled dense (diffusers
  blocks compiled regionally);
- schedules: CAT's fixed schedule (t0 dense warm-up steps, then one keep count K, a multiple
  of ``--align``) at the MAC budgets ``--budgets`` (MACs from ``tokprune.pruning.macs`` when it
  imports, else the analytic counter below, checked against ``torch.utils.flop_counter``);
- per step (CUDA events): transformer-call latency, CAT select / observe, host enqueue time;
  per bucket: latency vs the MAC-ratio prediction (dense step of the same mode x MAC ratio);
  per loop: latency, speedup vs eager dense, peak memory, counted-FLOP floor at the measured
  bf16 matmul rate (8192^3) and copy bandwidth;
- correctness guard before timing: keep-all pruned == diffusers dense (rel. error <= --tol),
  each bucket with caches filled from the same input == dense, no NaN; repeated for every
  compiled graph.

Robustness for a one-shot run: every mode is wrapped in try/except; a global time budget
(``--time-budget``) skips modes that would not fit (compile-time estimates are refined as
graphs compile) and a hard alarm at budget + ``--hard-grace`` aborts whatever runs; JSON and
markdown are rewritten under ``--out`` after every mode.

Compile mode: ``default`` inductor (no CUDA graphs, no GEMM autotuning). Justification: each
step at this size is >= ~8 ms of GPU work, while the compiled graph launches a few hundred
kernels (~2-3 ms of host time), so the host stays ahead of the GPU and CUDA graphs would buy
nothing (the ``host ms`` column shows it); CUDA graphs would also copy the 1.2 GB of K/V caches
into static buffers (or need static cache addresses and cloned outputs) and tie output
lifetimes across the three bucket graphs. ``max-autotune-no-cudagraphs`` autotunes each
distinct GEMM shape (~10 shapes per bucket graph) and would not fit the time budget;
cuBLAS already runs these large bf16 GEMMs near peak.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T_START


# ---------------------------------------------------------------------------- imports
def import_tokprune():
    """``import tokprune.pruning``; if the package is not installed, map the repo's folders by hand
    (pyproject maps ``tokprune.pruning`` -> ``pruning/`` etc.)."""
    try:
        import tokprune.pruning  # noqa: F401
    except ImportError:
        repo = Path(__file__).resolve().parents[2]
        sys.path.insert(0, str(repo))
        for m in [m for m in sys.modules if m == "tokprune" or m.startswith("tokprune.")]:
            del sys.modules[m]
        import tokprune

        if str(repo) not in list(tokprune.__path__):
            tokprune.__path__.append(str(repo))  # tokprune.pruning -> <repo>/pruning
        import tokprune.pruning  # noqa: F401
    import tokprune.pruning as pruning

    return pruning


import torch  # noqa: E402

pruning = import_tokprune()
from tokprune.pruning.forward import patchify, pruned_forward, scatter_rows  # noqa: E402
from tokprune.pruning.geometry import Geometry  # noqa: E402
from tokprune.pruning.plan import ALL, PrunePlan  # noqa: E402
from tokprune.pruning.sampler import TokenPruner  # noqa: E402

# ---------------------------------------------------------------------------- configs
FULL_CFG = dict(  # SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json)
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
TINY_CFG = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
    caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=96,
)


class HardDeadline(Exception):
    pass


# ---------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on a GPU; ``time.perf_counter`` (synchronous CPU ops) otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summ(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------- MACs
def local_step_macs(g: Geometry, keep: int, keep_text: int | None = None) -> int:
    """Analytic MACs of one ``pruned_forward`` call (reuse='noise'), whole batch included.

    Mirrors pruning/forward.py: patch embedding on all N, K image rows through every linear, text
    rows always, attention (K [+T]) x (N + T), final projection on K rows. The last block is
    context_pre_only (no text queries / text out-proj / text FF). Diffusers' dense forward also
    runs text queries through the last block's attention: +2*B*T*(N+T)*D, <0.4% at 1024^2.
    """
    if keep == 0:  # reuse step: no transformer call
        return 0
    B, N, D, L = g.batch, g.num_tokens, g.dim, g.num_layers
    T = g.text_tokens if keep_text is None else keep_text
    K = keep
    m = B * N * g.patch * g.patch * g.in_channels * D  # PatchEmbed conv
    m += B * (256 * D + D * D + g.pooled_dim * D + D * D)  # timestep + pooled embeddings
    m += B * T * g.joint_attention_dim * D  # context_embedder
    for i in range(L):
        last = i == L - 1
        m += B * D * 6 * D + B * D * (2 if last else 6) * D  # adaLN modulations (image, text)
        m += 3 * B * K * D * D + 3 * B * T * D * D  # q, k, v image / text
        sq = K + (0 if last else T)
        m += 2 * B * sq * (N + T) * D  # QK^T and PV
        m += 9 * B * K * D * D  # image out-proj + FF (4x up, down)
        if not last:
            m += 9 * B * T * D * D  # text out-proj + FF
        if g.is_dual(i):  # SD3.5 image-only attention (not in SD3-medium)
            m += B * D * 3 * D + 4 * B * K * D * D + 2 * B * K * N * D
    m += B * D * 2 * D + B * K * D * g.token_channels  # norm_out adaLN + proj_out
    return int(m)


class MacCounter:
    """``tokprune.pruning.macs.step_macs`` when it imports and answers; the local count otherwise."""

    def __init__(self, g: Geometry):
        self.g = g
        self.source = "local analytic (results/gpu/bench_sd3_medium.py)"
        self.fn = None
        self.note = None
        try:
            from tokprune.pruning import macs as _m  # noqa: WPS433

            v = int(_m.step_macs(g, g.num_tokens))
            if v <= 0:
                raise ValueError(f"step_macs(dense) = {v}")
            self.fn = _m.step_macs
            self.source = "tokprune.pruning.macs.step_macs"
        except Exception as exc:  # noqa: BLE001
            self.note = f"tokprune.pruning.macs unavailable ({type(exc).__name__}: {exc}); using the local counter"
        self._cache: dict[int, int] = {}

    def step(self, keep: int) -> int:
        if keep not in self._cache:
            v = None
            if self.fn is not None:
                try:
                    v = int(self.fn(self.g, keep))
                except Exception as exc:  # noqa: BLE001
                    self.note = f"macs.step_macs failed at K={keep}: {exc!r}; local counter used"
                    self.fn, self.source = None, "local analytic (fallback)"
            self._cache[keep] = v if v is not None else local_step_macs(self.g, keep)
        return self._cache[keep]

    def dense(self) -> int:
        return self.step(self.g.num_tokens)

    def ratio(self, keep: int) -> float:
        return self.step(keep) / self.dense()

    def plan_fraction(self, keeps: list[int]) -> float:
        return sum(self.step(k) for k in keeps) / (len(keeps) * self.dense())


def cat_schedule(mc: MacCounter, budget: float, steps: int, warmup: int, align: int, min_keep: int):
    """CAT's fixed schedule at a MAC budget: t0 dense steps then one K (multiple of ``align``).

    t0 = ``warmup`` (CAT: 8 of 28) when some K >= ``min_keep`` meets the budget; otherwise the largest
    smaller t0 that allows one. K = the largest aligned keep count whose plan fraction <= budget.
    """
    n = mc.g.num_tokens
    for t0 in range(min(warmup, steps - 1), 0, -1):
        best = None
        for k in range(align, n, align):
            frac = mc.plan_fraction([n] * t0 + [k] * (steps - t0))
            if frac <= budget + 1e-9:
                best = (k, frac)
            else:
                break
        if best is not None and best[0] >= min_keep:
            keeps = [n] * t0 + [best[0]] * (steps - t0)
            return {"budget": budget, "t0": t0, "K": best[0], "mac_fraction": best[1], "keeps": keeps,
                    "note": None if t0 == warmup else f"t0 lowered from {warmup} to {t0}: with {warmup} dense "
                    f"steps the budget needs K < {min_keep} (min keep)"}
    raise ValueError(f"budget {budget} is infeasible with K >= {min_keep} and >= 1 dense warm-up step")


def describe(keeps: list[int], n: int, mc: "MacCounter", *, budget, source: str) -> dict:
    t0 = 0
    while t0 < len(keeps) and keeps[t0] == n:
        t0 += 1
    pr = sorted(set(keeps) - {n, 0}, reverse=True)
    return {"budget": budget, "t0": t0, "K": pr[0] if len(pr) == 1 else pr, "reuse_steps": keeps.count(0),
            "mac_fraction": mc.plan_fraction(keeps), "keeps": keeps, "source": source, "note": None}


def parse_schedule(spec: str, n: int, steps: int) -> list[int]:
    """'N*8,1024*20' or a JSON file {"image_keep": [...]} (-1 = all) -> per-step keep counts."""
    if os.path.isfile(spec):
        raw = json.loads(Path(spec).read_text())
        if isinstance(raw, dict) and "plan" in raw and "buckets" in raw:  # a tokprune.calibrate Schedule file
            from tokprune.calibrate import Schedule

            plan = Schedule.load(spec, expect_steps=steps).to_plan()
            keeps = [plan.image_k(s, n) for s in range(plan.num_steps)]
        else:
            keeps = raw["image_keep"] if isinstance(raw, dict) else raw
            keeps = [n if int(k) in (ALL, n) else int(k) for k in keeps]
    else:
        keeps = []
        for part in spec.split(","):
            part = part.strip()
            val, _, rep = part.partition("*")
            k = n if val.strip().upper() == "N" else int(val)
            keeps += [k] * (int(rep) if rep else 1)
    if len(keeps) != steps:
        raise ValueError(f"--schedule has {len(keeps)} steps, expected {steps}")
    if keeps[0] != n or any(not 0 <= k <= n for k in keeps):
        raise ValueError("--schedule: step 0 must be dense and every K in [0, N] (0 = reuse)")
    return keeps


# ---------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "host_cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    }
    for mod in ("diffusers", "triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), sm_count=p.multi_processor_count,
                   total_memory_gib=round(p.total_memory / 2**30, 2), capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version(),
                   sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                         "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                         "math": torch.backends.cuda.math_sdp_enabled()})
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    try:
        q = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,"
             "temperature.gpu,pstate")
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=15)
        env["nvidia_smi"] = {"query": q, "out": r.stdout.strip() or r.stderr.strip()}
        env["driver"] = r.stdout.split(",")[1].strip() if r.returncode == 0 and "," in r.stdout else None
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
        env["driver"] = None
    return env


def measure_ceilings(device: torch.device, clock: Clock, tiny: bool, dtype: torch.dtype) -> dict:
    """Matmul rate in the run's dtype (n^3, random data) and device-to-device copy bandwidth."""
    tiny = tiny or device.type != "cuda"
    n = 1024 if tiny else 8192
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    reps = 3 if tiny else 20
    for _ in range(2 if tiny else 5):
        c = a @ b
    times = []
    for _ in range(reps):
        s = clock.mark()
        c = a @ b
        e = clock.mark()
        clock.sync()
        times.append(clock.ms(s, e))
    del a, b, c
    t = statistics.median(times)
    out = {"gemm_n": n, "gemm_dtype": str(dtype).replace("torch.", ""), "gemm_ms_median": t, "gemm_ms_min": min(times),
           "gemm_tflops": 2 * n**3 / (t * 1e-3) / 1e12}
    nbytes = (64 << 20) if tiny else (1 << 30)
    src = torch.randn(nbytes // 2, device=device, dtype=dtype, generator=g)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(3 if tiny else 10):
        s = clock.mark()
        dst.copy_(src)
        e = clock.mark()
        clock.sync()
        times.append(clock.ms(s, e))
    del src, dst
    t = statistics.median(times)
    out.update(copy_bytes=nbytes, copy_ms_median=t, copy_gbps=2 * nbytes / (t * 1e-3) / 1e9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------- model & inputs
def build_model(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """Random SD3 transformer, initialised on the device (fp32 init, then cast)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # diffusers' modules keep PyTorch's default (random, non-zero) Linear init, adaLN included;
    # make sure of it: a zero adaLN would make every gate 0 and every block a no-op.
    for name, mod in model.named_modules():
        if name.endswith("norm1.linear") or name.endswith("norm1_context.linear") or name == "norm_out.linear":
            if float(mod.weight.float().abs().max()) == 0.0:
                torch.nn.init.normal_(mod.weight, std=0.02)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def flow_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """FlowMatchEuler-like sigmas (SD3: shift 3), steps + 1 values ending at 0."""
    s = [1.0 - i / steps for i in range(steps)]
    s = [shift * x / (1 + (shift - 1) * x) for x in s]
    return s + [0.0]


class Inputs:
    def __init__(self, g: Geometry, device, dtype, steps: int, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        c, (h, w) = g.in_channels, g.latent_hw
        self.latent0 = torch.randn(1, c, h, w, device=device, generator=gen)  # fp32, one image
        self.ehs = torch.randn(g.batch, g.text_tokens, g.joint_attention_dim, device=device, generator=gen).to(dtype)
        self.pooled = torch.randn(g.batch, g.pooled_dim, device=device, generator=gen).to(dtype)
        self.sigmas = flow_sigmas(steps)
        # timesteps stay fp32, as the pipeline passes them (diffusers casts after the sinusoidal projection)
        self.t_dev = torch.tensor([s * 1000.0 for s in self.sigmas[:-1]], device=device, dtype=torch.float32)
        self.probe_latent = torch.randn(g.batch, c, h, w, device=device, generator=gen).to(dtype)
        self.probe_t = self.t_dev[min(10, steps - 1)].expand(g.batch)
        self.dtype = dtype


# ---------------------------------------------------------------------------- step recording
class Recorder:
    """Per-step events: call start/end, CAT select / observe spans, host enqueue time."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.steps: list[dict] = []
        self.cur: dict | None = None

    def wrap_policy(self, policy) -> None:
        sel, obs = policy.select, policy.observe  # bound methods

        def select(*args, **kwargs):
            a = self.clock.mark()
            r = sel(*args, **kwargs)
            b = self.clock.mark()
            if self.cur is not None:
                self.cur["sel"] = (a, b)
            return r

        def observe(*args, **kwargs):
            a = self.clock.mark()
            r = obs(*args, **kwargs)
            b = self.clock.mark()
            if self.cur is not None:
                self.cur["obs"] = (a, b)
            return r

        policy.select, policy.observe = select, observe  # instance attributes shadow the methods


def denoise_loop(call, keeps: list[int], inp: Inputs, g: Geometry, rec: Recorder, guidance: float):
    """28-step CFG flow-matching loop; ``call(s, x, t)`` -> (B, C, H, W) noise. Returns (loop events, latent)."""
    clock = rec.clock
    lat = inp.latent0.clone()
    steps = []
    l0 = clock.mark()
    for s, k in enumerate(keeps):
        x = torch.cat([lat] * g.batch).to(inp.dtype)  # (B, C, H, W): [uncond, cond]
        t = inp.t_dev[s].expand(g.batch)
        rec.cur = {"step": s, "K": k}
        h0 = time.perf_counter()
        a = clock.mark()
        noise = call(s, x, t)
        b = clock.mark()
        rec.cur["host_ms"] = (time.perf_counter() - h0) * 1e3
        rec.cur["call"] = (a, b)
        steps.append(rec.cur)
        rec.cur = None
        u, c = noise.float().chunk(2)  # (1, C, H, W) each  (batch 2 = one CFG pair)
        v = u + guidance * (c - u)
        lat = lat + (inp.sigmas[s + 1] - inp.sigmas[s]) * v
    l1 = clock.mark()
    return (l0, l1), steps, lat


def resolve_steps(clock: Clock, loop_ev, steps):
    clock.sync()
    out = []
    for st in steps:
        d = {"step": st["step"], "K": st["K"], "host_ms": st["host_ms"], "call_ms": clock.ms(*st["call"])}
        d["select_ms"] = clock.ms(*st["sel"]) if "sel" in st else 0.0
        d["observe_ms"] = clock.ms(*st["obs"]) if "obs" in st else 0.0
        out.append(d)
    return clock.ms(*loop_ev), out


class PrunedBucket(torch.nn.Module):
    """Static-shape bucket: the pure ``pruned_forward`` at keep count K (inplace=False, reuse='noise').

    forward(latent, ehs, pooled, t, idx (B, K), caches: list in ``names`` order or None (K == N),
    prev (B, C, H, W) or None) -> (noise (B, C, H, W), fresh K/V rows per cache name, in ``names`` order).
    """

    def __init__(self, model, geometry, keep, names):
        super().__init__()
        self.model = model
        self.geometry = geometry
        self.keep = keep
        self.names = tuple(names)

    def forward(self, latent, ehs, pooled, t, idx, caches, prev):
        cd = None if caches is None else dict(zip(self.names, caches))
        out = pruned_forward(self.model, self.geometry, latent=latent, encoder_hidden_states=ehs,
                             pooled_projections=pooled, timestep=t, img_idx=idx, caches=cd,
                             prev_noise=prev, reuse="noise", inplace=False)
        return out.noise, tuple(out.fresh[n] for n in self.names)


# ---------------------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
        self.dtype = getattr(torch, args.dtype)
        self.clock = Clock(self.device)
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.res: dict = {
            "issue": 7, "script": "results/gpu/bench_sd3_medium.py",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "argv": sys.argv, "cwd": os.getcwd(), "started_utc": datetime.datetime.utcnow().isoformat() + "Z",
            "args": vars(args), "notes": [], "errors": [], "skipped": [], "correctness": [], "modes": {},
            "compile": {"mode": args.compile_mode, "graphs": {}},
        }
        self.compile_times: list[float] = []
        self.big_graphs = 0
        self.buckets: dict[int, torch.nn.Module] = {}

    # ---- bookkeeping ---------------------------------------------------------------
    def note(self, msg: str) -> None:
        log("NOTE " + msg)
        self.res["notes"].append(msg)

    def fail(self, what: str, exc: BaseException) -> None:
        tb = traceback.format_exc()
        log(f"ERROR in {what}: {type(exc).__name__}: {exc}")
        print(tb[-3000:], flush=True)
        self.res["errors"].append({"where": what, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-6000:]})

    def compile_est(self) -> float:
        """Seconds one pruned bucket graph takes to compile: the slowest measured so far, else --compile-estimate."""
        return max(self.compile_times) if self.compile_times else self.args.compile_estimate

    def fits(self, what: str, est_s: float) -> bool:
        left = self.args.time_budget - elapsed()
        if est_s > left:
            msg = f"{what}: skipped, needs ~{est_s:.0f} s but {left:.0f} s of --time-budget {self.args.time_budget} left"
            log("SKIP " + msg)
            self.res["skipped"].append(msg)
            return False
        return True

    def save(self) -> None:
        self.res["wall_s"] = elapsed()
        try:
            (self.out_dir / "gpu_results.json").write_text(json.dumps(self.res, indent=1, default=str))
            (self.out_dir / "gpu_results.md").write_text(self.table())
        except Exception as exc:  # noqa: BLE001
            log(f"could not write results: {exc!r}")

    def mem_reset(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None

    # ---- setup ---------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        self.res["env"] = environment(self.device)
        log(f"device: {self.res['env'].get('device')}  torch {torch.__version__}  diffusers "
            f"{self.res['env'].get('diffusers')}  driver {self.res['env'].get('driver')}")
        cfg = dict(TINY_CFG if self.tiny else FULL_CFG)
        if a.layers:
            cfg["num_layers"] = a.layers
        self.res["model_config"] = cfg
        self.res["ceilings"] = measure_ceilings(self.device, self.clock, self.tiny, self.dtype)
        c = self.res["ceilings"]
        log(f"ceilings: {c['gemm_dtype']} {c['gemm_n']}^3 matmul {c['gemm_tflops']:.3g} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
        t0 = time.perf_counter()
        self.model = build_model(cfg, self.device, self.dtype, a.seed)
        self.clock.sync()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.res["model"] = {"params": sum(p.numel() for p in self.model.parameters()),
                             "weight_bytes": self.weight_bytes, "build_s": time.perf_counter() - t0}
        lat_hw = (a.latent, a.latent)
        self.g = Geometry.from_model(self.model, batch=2, latent_hw=lat_hw, text_tokens=a.text_tokens)
        g = self.g
        self.res["geometry"] = {"batch": g.batch, "latent_hw": g.latent_hw, "N": g.num_tokens, "T": g.text_tokens,
                                "D": g.dim, "layers": g.num_layers, "heads": g.heads, "head_dim": g.head_dim}
        log(f"model: {self.res['model']['params'] / 1e9:.3f} B params, built in {self.res['model']['build_s']:.1f} s;"
            f" N={g.num_tokens} T={g.text_tokens} B={g.batch} D={g.dim} L={g.num_layers}")
        self.inp = Inputs(g, self.device, self.dtype, a.steps, a.seed)
        self.names = list(g.cache_specs("noise"))
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.res["cache_bytes"] = sum(math.prod(s) for s in g.cache_specs("noise").values()) * itemsize
        # gates must be non-trivial (random adaLN)
        with torch.no_grad():
            blk = self.model.transformer_blocks[0]
            temb = self.model.time_text_embed(self.inp.probe_t, self.inp.pooled)
            emb = blk.norm1.linear(blk.norm1.silu(temb)).float()
            gate = emb.chunk(6, dim=1)[2]
            self.res["adaln_gate_msa_block0"] = {"mean_abs": float(gate.abs().mean()), "std": float(gate.std())}
        # MACs and schedules
        self.mc = MacCounter(g)
        if self.mc.note:
            self.note(self.mc.note)
        n = g.num_tokens
        self.schedules: dict[str, dict] = {}
        min_keep = max(a.align, int(round(a.min_keep_frac * n / a.align)) * a.align)
        for b in a.budgets:
            try:
                self.schedules[f"cat b={b:g}"] = s = self.cat(b, min_keep)
                if s["note"]:
                    self.note(f"budget {b}: {s['note']}")
            except Exception as exc:  # noqa: BLE001
                self.fail(f"schedule b={b}", exc)
        for b in a.calib_budgets:
            try:
                self.schedules[f"calib b={b:g}"] = self.calibrated(b)
            except Exception as exc:  # noqa: BLE001
                self.fail(f"calibrated schedule b={b}", exc)
        if a.schedule:
            try:
                keeps = parse_schedule(a.schedule, n, a.steps)
                self.schedules["custom"] = describe(keeps, n, self.mc, budget=None, source=f"--schedule {a.schedule}")
            except Exception as exc:  # noqa: BLE001
                self.fail("--schedule", exc)
        self.res["schedules"] = {k: {kk: vv for kk, vv in v.items()} for k, v in self.schedules.items()}
        buckets = sorted({k for s in self.schedules.values() for k in s["keeps"]})
        self.res["macs"] = {
            "source": self.mc.source, "dense_step_macs": self.mc.dense(),
            "dense_step_flops": 2 * self.mc.dense(),
            "local_dense_step_macs": local_step_macs(g, n),
            "floor_uses": "local analytic counter (checked against torch.utils.flop_counter)",
            "buckets": {str(k): {"macs": self.mc.step(k), "ratio": self.mc.ratio(k),
                                 "local_ratio": local_step_macs(g, k) / local_step_macs(g, n)} for k in buckets},
        }
        for name, s in self.schedules.items():
            log(f"schedule {name}: t0={s['t0']} K={s['K']} MAC fraction {s['mac_fraction']:.4f}; {s['source']}")
        self.flop_check()
        self.save()

    def cat(self, budget: float, min_keep: int) -> dict:
        """CAT's fixed schedule: ``tokprune.calibrate.cat_schedule`` (the project's CAT reference), else the local rule."""
        a, n = self.args, self.g.num_tokens
        if a.cat_rule == "repo":
            try:
                from tokprune.calibrate.baselines import cat_schedule as repo_cat

                plan = repo_cat(self.g, a.steps, budget, t0_fraction=a.warmup_steps / a.steps, align=a.align)
                keeps = [plan.image_k(s, n) for s in range(plan.num_steps)]
                d = describe(keeps, n, self.mc, budget=budget,
                             source="tokprune.calibrate.baselines.cat_schedule (t0 shrinks only when even the smallest"
                                    " aligned K misses the budget; K closest to the budget)")
                if d["t0"] != a.warmup_steps:
                    d["note"] = f"cat_schedule lowered t0 from {a.warmup_steps} to {d['t0']} (K={d['K']})"
                return d
            except Exception as exc:  # noqa: BLE001
                self.note(f"tokprune.calibrate cat_schedule unavailable ({type(exc).__name__}: {exc}); local CAT rule")
        s = cat_schedule(self.mc, budget, a.steps, a.warmup_steps, a.align, min_keep)
        d = describe(s["keeps"], n, self.mc, budget=budget, source="local CAT rule (results/gpu/bench_sd3_medium.py)")
        d["note"] = s["note"]
        return d

    def calibrated(self, budget: float) -> dict:
        """A bucketed schedule without a pipeline: the structure calibration would measure first on a model
        whose early steps matter most (``tokprune.calibrate.search.realize`` of a falling keep profile after
        CAT's warm-up). Random weights cannot be calibrated for quality; this row measures speed only."""
        from tokprune.calibrate.search import Structure, realize

        a, g = self.args, self.g
        n, steps = g.num_tokens, a.steps
        plan = realize(Structure(round(a.warmup_steps), shape="down"), g, steps, budget, align=a.align,
                       max_buckets=a.calib_max_buckets)
        if plan is None:
            raise ValueError(f"no bucketed schedule reaches budget {budget} with {a.calib_max_buckets} buckets")
        keeps = [plan.image_k(s, n) for s in range(steps)]
        d = describe(keeps, n, self.mc, budget=budget,
                     source=f"tokprune.calibrate.search.realize(warm-up {a.warmup_steps}, falling keep profile, "
                            f"max_buckets={a.calib_max_buckets}); text not pruned")
        return d

    def flop_check(self) -> None:
        """The analytic counter against torch.utils.flop_counter (math SDPA so attention is counted)."""
        if self.args.no_flop_check:
            return
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.utils.flop_counter import FlopCounterMode

            g, inp = self.g, self.inp
            out = {}
            ks = [g.num_tokens] + [s["K"] for s in self.schedules.values() if isinstance(s["K"], int)][:1]
            caches = {nm: torch.randn(s, device=self.device, dtype=self.dtype) for nm, s in g.cache_specs().items()}
            for k in ks:
                idx = torch.arange(k, device=self.device).expand(g.batch, k)
                with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
                    pruned_forward(self.model, g, latent=inp.probe_latent, encoder_hidden_states=inp.ehs,
                                   pooled_projections=inp.pooled, timestep=inp.probe_t, img_idx=idx, caches=caches,
                                   prev_noise=inp.probe_latent)
                counted = fc.get_total_flops() // 2
                out[str(k)] = {"counted_macs": counted, "local_macs": local_step_macs(g, k),
                               "macs_py": self.mc.step(k) if self.mc.fn is not None else None,
                               "local_over_counted": local_step_macs(g, k) / max(counted, 1)}
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
                self.model(hidden_states=inp.probe_latent, encoder_hidden_states=inp.ehs,
                           pooled_projections=inp.pooled, timestep=inp.probe_t, return_dict=False)
            out["diffusers_dense"] = {"counted_macs": fc.get_total_flops() // 2}
            self.res["macs"]["flop_counter_check"] = out
            log("flop check (analytic / counted): " + ", ".join(
                f"K={k}: {v['local_over_counted']:.4f}" for k, v in out.items() if "local_over_counted" in v))
        except Exception as exc:  # noqa: BLE001
            self.fail("flop_check", exc)

    # ---- correctness -----------------------------------------------------------------
    def _pruned_ref(self, keep: int, caches, prev):
        g, inp = self.g, self.inp
        idx = torch.arange(g.num_tokens, device=self.device).expand(g.batch, g.num_tokens) if keep == g.num_tokens \
            else self.probe_idx(keep)
        return pruned_forward(self.model, g, latent=inp.probe_latent, encoder_hidden_states=inp.ehs,
                              pooled_projections=inp.pooled, timestep=inp.probe_t, img_idx=idx, caches=caches,
                              prev_noise=prev, inplace=True), idx

    def probe_idx(self, keep: int) -> torch.Tensor:
        """A fixed, scattered (B, K) index set (sorted, unique): a different random subset per sample."""
        g = self.g
        gen = torch.Generator(device=self.device).manual_seed(123 + keep)
        r = torch.rand(g.batch, g.num_tokens, device=self.device, generator=gen)
        return r.argsort(dim=1)[:, :keep].sort(dim=1).values

    def check(self, name: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
        """rel_err vs the bf16 diffusers output (the issue's criterion, <= --tol); when that misses, the result still
        passes if it is as close to the fp32 reference as bf16 diffusers itself is (<= max(tol, 2 x its error))."""
        e = rel_err(got, ref)
        ok_f = finite(got)
        row = {"check": name, "rel_err": e, "finite": ok_f, "tol": self.args.tol, "pass": bool(ok_f and e <= self.args.tol)}
        ref32 = getattr(self, "ref32", None)
        if ref32 is not None:
            row["rel_err_vs_fp32"] = rel_err(got, ref32)
            row["bf16_diffusers_vs_fp32"] = self.e_base
            if ok_f and not row["pass"] and row["rel_err_vs_fp32"] <= max(self.args.tol, 2 * self.e_base):
                row["pass"] = True
                row["passed_by"] = "fp32-reference (as accurate as bf16 diffusers)"
        self.res["correctness"].append(row)
        extra = f" (vs fp32 {row['rel_err_vs_fp32']:.2e}; bf16 diffusers vs fp32 {self.e_base:.2e})" \
            if "rel_err_vs_fp32" in row else ""
        log(f"check {name}: rel_err {e:.2e}{extra} finite={ok_f} -> {'PASS' if row['pass'] else 'FAIL'}")
        return row

    def fp32_reference(self) -> None:
        """Dense diffusers forward of an fp32 copy of the model on the same (upcast) inputs, TF32 off."""
        import copy

        inp = self.inp
        m32 = copy.deepcopy(self.model).float()
        try:
            with torch.no_grad():
                self.ref32 = m32(hidden_states=inp.probe_latent.float(), encoder_hidden_states=inp.ehs.float(),
                                 pooled_projections=inp.pooled.float(), timestep=inp.probe_t, return_dict=False)[0]
        finally:
            del m32
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.e_base = rel_err(self.ref_noise, self.ref32)
        self.res["correctness_reference"] = {"bf16_diffusers_vs_fp32_rel_err": self.e_base}
        log(f"fp32 reference: bf16 diffusers vs fp32 rel_err {self.e_base:.2e}")

    def correctness_eager(self) -> None:
        g, inp = self.g, self.inp
        with torch.no_grad():
            ref = self.model(hidden_states=inp.probe_latent, encoder_hidden_states=inp.ehs,
                             pooled_projections=inp.pooled, timestep=inp.probe_t, return_dict=False)[0]
            self.ref_noise = ref.clone()
            mabs = float(ref.float().abs().mean())
            ok = finite(ref) and mabs > 0.0
            self.res["correctness"].append({"check": "diffusers dense output finite and non-zero", "rel_err": 0.0,
                                            "finite": finite(ref), "mean_abs": mabs, "tol": None, "pass": ok})
            log(f"check diffusers dense output: finite={finite(ref)} mean|out|={mabs:.3g} -> {'PASS' if ok else 'FAIL'}")
            try:
                self.fp32_reference()
            except Exception as exc:  # noqa: BLE001
                self.fail("fp32 reference", exc)
            self.ref_caches = {nm: torch.zeros(s, device=self.device, dtype=self.dtype)
                               for nm, s in g.cache_specs("noise").items()}
            out, _ = self._pruned_ref(g.num_tokens, self.ref_caches, None)
            self.check("eager pruned keep-all == diffusers dense", out.noise, ref)
            for k in self.all_pruned_ks():
                caches = {nm: c.clone() for nm, c in self.ref_caches.items()}
                out, _ = self._pruned_ref(k, caches, ref)
                self.check(f"eager pruned K={k} (caches from same input) == dense", out.noise, ref)
                del caches

    def all_pruned_ks(self) -> list[int]:
        n = self.g.num_tokens
        return sorted({k for s in self.schedules.values() for k in s["keeps"] if k not in (0, n)})

    # ---- modes ---------------------------------------------------------------------------
    def run_mode(self, name: str, keeps: list[int], make_call, *, est_loop_s: float, extra: dict | None = None,
                 setup_run=None) -> None:
        """Warm-up loops, then timed loops; stores per-step and per-loop numbers under res['modes'][name]."""
        a = self.args
        rec = Recorder(self.clock)
        call = make_call(rec)
        m = {"status": "running", "keeps": keeps, "mac_fraction": self.mc.plan_fraction(keeps), **(extra or {})}
        self.res["modes"][name] = m
        log(f"mode {name}: warm-up")
        with torch.no_grad():
            for _ in range(a.warmup_loops):
                if setup_run:
                    setup_run()
                ev, st, lat = denoise_loop(call, keeps, self.inp, self.g, rec, a.guidance)
                w_ms, _ = resolve_steps(self.clock, ev, st)
                m.setdefault("warmup_loop_ms", []).append(w_ms)
            base = self.mem_reset()
            dyn0 = _dynamo_counters()
            loops, steps_all, finite_ok = [], [], True
            for r in range(a.repeats):
                if r > 0 and elapsed() + (loops[-1] / 1e3 if loops else est_loop_s) * 1.2 > a.time_budget:
                    self.note(f"{name}: stopped after {r} timed loops (time budget)")
                    break
                if setup_run:
                    setup_run()
                ev, st, lat = denoise_loop(call, keeps, self.inp, self.g, rec, a.guidance)
                loop_ms, steps = resolve_steps(self.clock, ev, st)
                finite_ok = finite_ok and finite(lat)
                loops.append(loop_ms)
                for d in steps:
                    d["loop"] = r
                steps_all += steps
            peak = self.mem_peak()
        dyn1 = _dynamo_counters()
        if dyn1.get("unique_graphs") != dyn0.get("unique_graphs"):
            self.note(f"{name}: torch.compile built new graphs DURING the timed loops ({dyn0} -> {dyn1}); "
                      "its loop times include compilation")
        m.update(status="ok", loop_ms=loops, loop=summ(loops), steps=steps_all, final_latent_finite=finite_ok,
                 peak_mem_bytes=peak, mem_before_loop_bytes=base,
                 # what a service would hold: weights + what the loop itself allocates (caches, activations);
                 # excludes this script's reference tensors (ref caches/noise, inputs) present before the loop
                 peak_weights_plus_loop_bytes=None if peak is None else self.weight_bytes + peak - base)
        self.summarize(name)
        self.save()
        log(f"mode {name}: loop {m['loop']['median']:.1f} ms (n={len(loops)}), finite={finite_ok}"
            + (f", peak {peak / 2**30:.2f} GiB" if peak else ""))

    def summarize(self, name: str) -> None:
        m = self.res["modes"][name]
        n = self.g.num_tokens
        steps = m["steps"]
        first_pruned = {}
        for d in steps:  # the first pruned step of each loop runs CAT's KMeans
            if d["K"] not in (0, n) and d["loop"] not in first_pruned:
                first_pruned[d["loop"]] = d["step"]
        per_k = {}
        for k in sorted(set(m["keeps"])):
            ds = [d for d in steps if d["K"] == k and first_pruned.get(d["loop"]) != d["step"]]
            if not ds:
                continue
            per_k[k] = {
                "n": len(ds), "call_ms": med([d["call_ms"] for d in ds]),
                "select_ms": med([d["select_ms"] for d in ds]), "observe_ms": med([d["observe_ms"] for d in ds]),
                "host_ms": med([d["host_ms"] for d in ds]), "mac_ratio": self.mc.ratio(k),
            }
            p = per_k[k]
            p["fwd_ms"] = p["call_ms"] - p["select_ms"] - p["observe_ms"]
            p["sel_pct_of_step"] = 100.0 * (p["select_ms"] + p["observe_ms"]) / p["call_ms"] if p["call_ms"] else None
        dense = per_k.get(n)
        for k, p in per_k.items():
            if dense and k not in (0, n):
                p["pred_ms"] = dense["call_ms"] * p["mac_ratio"]
                p["dev_pct"] = 100.0 * (p["call_ms"] / p["pred_ms"] - 1.0)
                p["pred_fwd_ms"] = dense["fwd_ms"] * p["mac_ratio"]
                p["dev_fwd_pct"] = 100.0 * (p["fwd_ms"] / p["pred_fwd_ms"] - 1.0)
        kms = [d for d in steps if first_pruned.get(d["loop"]) == d["step"]]
        m["per_bucket"] = {str(k): v for k, v in per_k.items()}
        if kms:
            m["first_pruned_step"] = {"call_ms": med([d["call_ms"] for d in kms]),
                                      "select_ms": med([d["select_ms"] for d in kms])}
        loops = sorted({d["loop"] for d in steps})
        sel_tot = [sum(d["select_ms"] + d["observe_ms"] for d in steps if d["loop"] == lp) for lp in loops]
        if m.get("loop_ms") and sel_tot:
            m["selection_pct_of_loop"] = 100.0 * med(sel_tot) / med(m["loop_ms"])
        # floor: counted FLOPs at the measured matmul rate; bytes at the measured copy bandwidth
        c = self.res["ceilings"]
        g = self.g
        flops = sum(2 * local_step_macs(g, k) for k in m["keeps"])  # the counter checked by flop_check
        isz = torch.empty((), dtype=self.dtype).element_size()
        kv_bytes = 2 * g.num_layers * g.batch * g.num_tokens * g.dim * isz  # read all K/V once per step
        byts = sum(self.weight_bytes + kv_bytes + 2 * g.num_layers * g.batch * k * g.dim * isz
                   for k in m["keeps"] if k > 0)
        m["floor"] = {"flops": flops, "compute_ms": flops / (c["gemm_tflops"] * 1e12) * 1e3,
                      "bytes": byts, "bytes_ms": byts / (c["copy_gbps"] * 1e9) * 1e3}
        m["floor"]["ms"] = max(m["floor"]["compute_ms"], m["floor"]["bytes_ms"])
        if m.get("loop"):
            m["pct_of_floor"] = 100.0 * m["floor"]["ms"] / m["loop"]["median"]

    # ---- mode factories -----------------------------------------------------------------------
    def mode_dense(self, name: str, compiled: bool) -> None:
        model, inp = self.model, self.inp

        def make_call(rec):
            def call(s, x, t):
                return model(hidden_states=x, encoder_hidden_states=inp.ehs, pooled_projections=inp.pooled,
                             timestep=t, return_dict=False)[0]
            return call

        est = self.dense_loop_s if hasattr(self, "dense_loop_s") else 30.0
        self.run_mode(name, [self.g.num_tokens] * self.args.steps, make_call, est_loop_s=est,
                      extra={"backend": "compiled" if compiled else "eager", "impl": "diffusers forward"})
        if not compiled:
            self.dense_loop_s = self.res["modes"][name]["loop"]["median"] / 1e3

    def mode_pruned_eager(self, name: str, keeps: list[int]) -> None:
        plan = PrunePlan(image_keep=tuple(ALL if k == self.g.num_tokens else k for k in keeps))
        holder = {}

        def make_call(rec):
            pruner = TokenPruner(self.model, plan, policy="cat", seed=self.args.seed, reuse="noise")
            rec.wrap_policy(pruner.policy)
            holder["p"] = pruner
            inp = self.inp

            def call(s, x, t):
                return pruner(x, inp.ehs, inp.pooled, t, return_dict=False)[0]
            return call

        try:
            self.run_mode(name, keeps, make_call, est_loop_s=getattr(self, "dense_loop_s", 30.0),
                          extra={"backend": "eager", "impl": "TokenPruner (CAT policy), pruned_forward inplace=True"},
                          setup_run=lambda: holder["p"].reset() if "p" in holder else None)
        finally:
            holder.clear()

    # compiled buckets ----------------------------------------------------------------------------
    def bucket(self, keep: int) -> torch.nn.Module:
        if keep in self.buckets:
            return self.buckets[keep]
        g = self.g

        mod = PrunedBucket(self.model, g, keep, self.names)
        if not self.args.no_compile:
            mod = torch.compile(mod, mode=None if self.args.compile_mode == "default" else self.args.compile_mode,
                                dynamic=False, fullgraph=False)
        self.buckets[keep] = mod
        return mod

    def compile_bucket(self, keep: int) -> bool:
        """First call compiles (timed, wall clock); then the compiled graph is checked against the dense reference."""
        if keep in self.buckets:
            return True
        if self.big_graphs >= self.args.max_graphs:
            self.res["skipped"].append(f"bucket K={keep}: --max-graphs {self.args.max_graphs} reached")
            return False
        if not self.fits(f"compile bucket K={keep}", self.compile_est() * 1.3 + 5):
            return False
        g, inp = self.g, self.inp
        mod = self.bucket(keep)
        dense = keep == g.num_tokens
        idx = torch.arange(g.num_tokens, device=self.device).expand(g.batch, g.num_tokens) if dense \
            else self.probe_idx(keep)
        caches = None if dense else [self.ref_caches[n] for n in self.names]
        prev = None if dense else self.ref_noise
        c0 = _dynamo_counters()
        self.clock.sync()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                noise, fresh = mod(inp.probe_latent, inp.ehs, inp.pooled, inp.probe_t, idx, caches, prev)
            self.clock.sync()
        except BaseException:
            self.buckets.pop(keep, None)
            raise
        dt = time.perf_counter() - t0
        self.big_graphs += 1
        c1 = _dynamo_counters()
        self.res["compile"]["graphs"][str(keep)] = {"first_call_s": dt, "dynamo_before": c0, "dynamo_after": c1}
        log(f"compiled bucket K={keep}: first call {dt:.1f} s; dynamo {c1}")
        if not self.args.no_compile:
            self.compile_times.append(dt)
        label = "compiled" if not self.args.no_compile else "bucket wrapper (no compile)"
        self.check(f"{label} pruned K={keep}" + (" (keep-all) == diffusers dense" if dense
                                                 else " (caches from same input) == dense"), noise, self.ref_noise)
        if dense:  # the fresh K/V rows should match what the eager keep-all step wrote into the caches (info)
            e = max(rel_err(f, self.ref_caches[n]) for n, f in zip(self.names, fresh))
            ok = all(finite(f) for f in fresh)
            self.res["kv_check"] = {"check": f"{label} keep-all fresh K/V vs eager caches (max over blocks)",
                                    "rel_err": e, "finite": ok}
            log(f"info {label} keep-all fresh K/V vs eager caches: max rel_err {e:.2e}, finite={ok}")
        del noise, fresh
        return True

    def mode_pruned_compiled(self, name: str, keeps: list[int]) -> None:
        g = self.g
        n = g.num_tokens
        need = [k for k in set(keeps) - {0} if k not in self.buckets]
        if self.big_graphs + len(need) > self.args.max_graphs:
            msg = (f"{name}: skipped, needs {len(need)} new bucket graphs {sorted(need)} but {self.big_graphs} of "
                   f"--max-graphs {self.args.max_graphs} are compiled")
            log("SKIP " + msg)
            self.res["skipped"].append(msg)
            return
        if not self.args.no_compile and not self.fits(
                f"{name} ({len(need)} new graphs)", len(need) * self.compile_est() * 1.2 + self.loops_est_s()):
            return
        for k in sorted(set(keeps) - {0}, key=lambda k: -k):  # dense graph first
            if not self.compile_bucket(k):
                self.res["skipped"].append(f"{name}: bucket K={k} not compiled, mode skipped")
                log(f"SKIP {name}: bucket K={k} not available")
                return
        policy_holder = {}
        state = {}
        arange_idx = torch.arange(n, device=self.device).expand(g.batch, n)
        specs = g.cache_specs("noise")

        def setup_run():
            state["caches"] = None  # allocated at step 0, inside the timed loop, as TokenPruner does
            state["prev"] = None

        def make_call(rec):
            from tokprune.pruning.policies import make_policy

            policy = make_policy("cat", seed=self.args.seed)
            takes_selected = "selected" in inspect.signature(policy.observe).parameters
            rec.wrap_policy(policy)
            policy_holder["p"] = policy
            inp = self.inp

            def call(s, x, t):
                k = keeps[s]
                if k == 0:  # reuse step (as TokenPruner.step): no transformer call
                    return state["prev"].clone()
                dense = k == n
                if state["caches"] is None:  # start of a run (TokenPruner._begin): caches + policy reset
                    state["caches"] = [torch.zeros(specs[nm], device=self.device, dtype=self.dtype)
                                       for nm in self.names]
                    policy.reset(batch=g.batch, grid=g.grid, device=self.device)
                idx = arange_idx if dense else policy.select(k)
                caches = state["caches"]
                noise, fresh = self.buckets[k](x, inp.ehs, inp.pooled, t, idx, None if dense else caches,
                                               None if dense else state["prev"].contiguous())
                for c, rows in zip(caches, fresh):  # write the fresh K/V rows into the caches
                    scatter_rows(c, idx, rows, inplace=True)
                state["prev"] = noise
                if takes_selected:
                    policy.observe(patchify(noise, g.patch), dense=dense, selected=None if dense else idx)
                else:
                    policy.observe(patchify(noise, g.patch), dense=dense)
                return noise
            return call

        try:
            self.run_mode(name, keeps, make_call, est_loop_s=getattr(self, "dense_loop_s", 30.0),
                          setup_run=setup_run,
                          extra={"backend": "compiled" if not self.args.no_compile else "eager-wrapper",
                                 "impl": "pure pruned_forward per static bucket (inplace=False) + eager scatter"
                                         " of fresh K/V rows + CAT select/observe",
                                 "compile_mode": self.args.compile_mode})
        finally:
            state.clear()
            policy_holder.clear()

    def mode_dense_compiled(self, name: str) -> None:
        """diffusers forward with every JointTransformerBlock compiled (regional compilation: one graph for
        the 23 identical blocks, one for the context_pre_only last block)."""
        if not self.fits("compile dense (regional)", self.compile_est() * 0.5 + self.loops_est_s()):
            return
        blocks = list(self.model.transformer_blocks)
        for blk in blocks:
            blk.compile(mode=None if self.args.compile_mode == "default" else self.args.compile_mode,
                        dynamic=False, fullgraph=False)
        try:
            inp = self.inp
            c0 = _dynamo_counters()
            self.clock.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model(hidden_states=inp.probe_latent, encoder_hidden_states=inp.ehs,
                                 pooled_projections=inp.pooled, timestep=inp.probe_t, return_dict=False)[0]
            self.clock.sync()
            dt = time.perf_counter() - t0
            self.res["compile"]["graphs"]["dense_regional"] = {"first_call_s": dt, "dynamo_before": c0,
                                                               "dynamo_after": _dynamo_counters()}
            log(f"compiled dense (regional) first call {dt:.1f} s")
            self.check("compiled dense (diffusers, regional) == eager dense", out, self.ref_noise)
            self.mode_dense(name, compiled=True)
            self.res["modes"][name]["compile_s"] = dt
        finally:
            for blk in blocks:  # back to eager for anything that follows
                blk._compiled_call_impl = None

    def loops_est_s(self) -> float:
        return getattr(self, "dense_loop_s", 3.0) * (self.args.repeats + self.args.warmup_loops) * 1.2

    # ---- orchestration -------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.setup()
        try:
            self.correctness_eager()
        except Exception as exc:  # noqa: BLE001
            self.fail("correctness (eager)", exc)
        self.save()
        plan = [("eager dense", lambda: self.mode_dense("eager dense", compiled=False))]
        for sname, s in self.schedules.items():
            plan.append((f"eager pruned {sname}", (lambda nm, ks: lambda: self.mode_pruned_eager(nm, ks))(
                f"eager pruned {sname}", s["keeps"])))
        # compiled buckets (with --no-compile the same bucket wrapper runs eagerly): the first schedule's buckets,
        # then the compiled diffusers dense baseline, then the other schedules while graphs and time remain
        tag = "compiled" if not a.no_compile else "wrapper(no compile)"
        scheds = list(self.schedules.items())
        compiled = [(f"{tag} pruned {sname}", (lambda nm, ks: lambda: self.mode_pruned_compiled(nm, ks))(
            f"{tag} pruned {sname}", s["keeps"])) for sname, s in scheds]
        plan += compiled[:1]
        if not a.no_compile:
            plan.append(("compiled dense", lambda: self.mode_dense_compiled("compiled dense")))
        plan += compiled[1:]
        wanted = [m.strip() for m in a.modes.split(",")] if a.modes else None
        for name, fn in plan:
            if wanted and not any(w in name for w in wanted):
                continue
            if not self.fits(name, self.loops_est_s()):
                continue
            try:
                fn()
            except HardDeadline as exc:
                self.fail(name, exc)
                self.res["modes"].setdefault(name, {})["status"] = "aborted (hard deadline)"
                break
            except Exception as exc:  # noqa: BLE001
                self.fail(name, exc)
                self.res["modes"].setdefault(name, {})["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                self.save()
        self.cross_ref()
        self.res["targets"] = self.targets()

    # ---- reporting --------------------------------------------------------------------------------
    def cross_ref(self) -> None:
        """Per bucket, also the prediction from the diffusers dense step of the same backend (eager / compiled)."""
        modes = self.res["modes"]
        for name, m in modes.items():
            ref = modes.get("compiled dense" if name.startswith("compiled") else "eager dense") or {}
            d = (ref.get("per_bucket") or {}).get(str(self.g.num_tokens))
            if not d or name in ("eager dense", "compiled dense"):
                continue
            for k, p in (m.get("per_bucket") or {}).items():
                if int(k) not in (0, self.g.num_tokens):
                    p["pred_from_diffusers_dense_ms"] = d["call_ms"] * p["mac_ratio"]
                    p["dev_vs_diffusers_pred_pct"] = 100.0 * (p["call_ms"] / p["pred_from_diffusers_dense_ms"] - 1)

    def targets(self) -> dict:
        modes = self.res["modes"]
        ed = modes.get("eager dense", {}).get("loop")
        out = {}
        if ed:
            for name, m in modes.items():
                if "b=0.5" in name and m.get("loop"):
                    out[f"{name}: >= 3.5x vs eager dense"] = {
                        "value": ed["median"] / m["loop"]["median"], "pass": ed["median"] / m["loop"]["median"] >= 3.5}
        for name, m in modes.items():
            for k, p in (m.get("per_bucket") or {}).items():
                if "dev_pct" in p:
                    out[f"{name} K={k}: within 10% of MAC prediction"] = {"value": p["dev_pct"],
                                                                          "pass": abs(p["dev_pct"]) <= 10.0}
                if int(k) != self.g.num_tokens and p.get("sel_pct_of_step") is not None:
                    out[f"{name} K={k}: selection < 3% of step"] = {"value": p["sel_pct_of_step"],
                                                                     "pass": p["sel_pct_of_step"] < 3.0}
        return out

    def table(self) -> str:
        r = self.res
        env = r.get("env", {})
        c = r.get("ceilings", {})
        lines = []
        lines.append(f"## SD3-medium token pruning benchmark{' (TINY CPU CONFIG)' if self.tiny else ''}")
        lines.append("")
        geo = r.get("geometry", {})
        lines.append(f"device: {env.get('device')} | driver {env.get('driver')} | torch {env.get('torch')} "
                     f"(cuda {env.get('torch_cuda')}) | diffusers {env.get('diffusers')} | triton {env.get('triton')}")
        lines.append(f"command: `{r.get('command')}`")
        if geo:
            lines.append(f"shape: B={geo['batch']} (CFG) N={geo['N']} T={geo['T']} D={geo['D']} L={geo['layers']}, "
                         f"{self.args.steps} steps, {self.args.dtype}; params {r.get('model', {}).get('params', 0) / 1e9:.3f} B; "
                         f"K/V caches {r.get('cache_bytes', 0) / 2**30:.2f} GiB; MACs: {r.get('macs', {}).get('source')}")
        if c:
            lines.append(f"ceilings: {c['gemm_dtype']} {c['gemm_n']}^3 matmul {c['gemm_tflops']:.3g} TFLOP/s; copy "
                         f"{c['copy_gbps']:.0f} GB/s; compile mode `{self.args.compile_mode}`; wall {elapsed():.0f} s")
        lines.append("")
        modes = r.get("modes", {})
        ed = (modes.get("eager dense") or {}).get("loop")
        lines.append("| mode | schedule | MAC frac | loop ms (med [min-max] n) | x vs eager dense | floor ms | "
                     "% of floor | peak GiB (weights+loop) | sel % loop | compile s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, m in modes.items():
            lp = m.get("loop")
            sched = sched_str(m.get("keeps", []), self.g.num_tokens)
            if not lp:
                lines.append(f"| {name} | {sched} | | {m.get('status')} | | | | | | |")
                continue
            comp = m.get("compile_s")
            if comp is None and "compiled" in name:
                comp = sum(v["first_call_s"] for k, v in r["compile"]["graphs"].items()
                           if k != "dense_regional" and int(k) in set(m.get("keeps", [])))
            pk = m.get("peak_weights_plus_loop_bytes")
            lines.append(
                f"| {name} | {sched} | {m['mac_fraction']:.3f} | {lp['median']:.1f} [{lp['min']:.1f}-{lp['max']:.1f}] "
                f"{lp['n']} | {(ed['median'] / lp['median']) if ed else float('nan'):.2f} | {m['floor']['ms']:.1f} | "
                f"{m.get('pct_of_floor', float('nan')):.0f} | {f'{pk / 2**30:.2f}' if pk else 'n/a'} | "
                f"{m.get('selection_pct_of_loop', 0.0):.2f} | {comp if comp is not None else '':{'.0f' if comp else ''}} |")
        lines.append("")
        lines.append("| mode | K | MAC ratio | step ms (med, n) | MAC pred ms | dev % | fwd-only ms | dev fwd % | "
                     "sel+obs ms | sel % step | host ms |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, m in modes.items():
            for k, p in (m.get("per_bucket") or {}).items():
                f = lambda v, fmt=".2f": "" if v is None else format(v, fmt)  # noqa: E731
                lines.append(f"| {name} | {k} | {p['mac_ratio']:.3f} | {p['call_ms']:.2f} ({p['n']}) | "
                             f"{f(p.get('pred_ms'))} | {f(p.get('dev_pct'), '+.1f')} | {p['fwd_ms']:.2f} | "
                             f"{f(p.get('dev_fwd_pct'), '+.1f')} | {p['select_ms'] + p['observe_ms']:.3f} | "
                             f"{f(p.get('sel_pct_of_step'))} | {p['host_ms']:.2f} |")
            fp = m.get("first_pruned_step")
            if fp:
                lines.append(f"| {name} | first pruned step (KMeans) | | {fp['call_ms']:.2f} | | | | | "
                             f"{fp['select_ms']:.3f} | | |")
        lines.append("")
        corr = r.get("correctness", [])
        if corr:
            bad = [x for x in corr if not x["pass"]]
            worst = max((x["rel_err"] for x in corr), default=0.0)
            lines.append("checks (rel err vs bf16 diffusers / vs fp32): " + "; ".join(
                f"{short_check(x['check'])}: {x['rel_err']:.1e}"
                + (f"/{x['rel_err_vs_fp32']:.1e}" if "rel_err_vs_fp32" in x else "")
                + ("" if x["pass"] else " FAIL") for x in corr))
            lines.append(f"correctness: {len(corr) - len(bad)}/{len(corr)} pass (tol {self.args.tol:g}, worst rel err "
                         f"{worst:.2e})" + ("; FAILED: " + "; ".join(f"{x['check']} ({x['rel_err']:.2e}, finite="
                                                                     f"{x['finite']})" for x in bad) if bad else ""))
        tg = r.get("targets") or self.targets()
        if tg:
            lines.append("targets: " + "; ".join(
                f"{k}: {v['value']:.2f} {'PASS' if v['pass'] else 'MISS'}" for k, v in tg.items()))
        for key in ("skipped", "errors"):
            if r.get(key):
                items = r[key] if key == "skipped" else [e["where"] + ": " + e["error"] for e in r[key]]
                lines.append(f"{key}: " + " | ".join(str(x)[:200] for x in items))
        if r.get("notes"):
            lines.append("notes: " + " | ".join(str(x)[:200] for x in r["notes"]))
        lines.append("")
        return "\n".join(lines)


def short_check(name: str) -> str:
    for a, b in ((" (caches from same input) == dense", ""), (" (keep-all) == diffusers dense", " keep-all"),
                 (" keep-all == diffusers dense", " keep-all"), ("bucket wrapper (no compile)", "wrapper"),
                 (" (diffusers, regional) == eager dense", " dense"), ("diffusers dense output finite and non-zero",
                                                                       "dense finite&nonzero")):
        name = name.replace(a, b)
    return name


def sched_str(keeps: list[int], n: int) -> str:
    if not keeps or all(k == n for k in keeps):
        return "dense"
    t0 = 0
    while t0 < len(keeps) and keeps[t0] == n:
        t0 += 1
    pr = sorted(set(keeps) - {0, n}, reverse=True)
    out = f"t0={t0}, K={'/'.join(map(str, pr))}"
    if keeps.count(n) > t0:
        out += f", +{keeps.count(n) - t0} dense"
    if keeps.count(0):
        out += f", {keeps.count(0)} reuse"
    return out


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(counters["graph_break"].values()),
                "recompile_limit_hits": sum(v for k, v in counters["frames"].items() if "limit" in str(k)) if
                counters.get("frames") else 0}
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/tokprune_gpu_bench",
                   help="folder for gpu_results.json / gpu_results.md (default $OUT)")
    p.add_argument("--tiny", action="store_true", help="tiny SD3 on CPU, same code path (plumbing check)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available, cpu with --tiny)")
    p.add_argument("--budgets", default="0.5,0.3", help="MAC budgets for CAT's fixed schedule")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--warmup-steps", type=int, default=8, help="CAT dense warm-up steps t0 (lowered if infeasible)")
    p.add_argument("--cat-rule", default="repo", choices=["repo", "local"], help="CAT schedule: tokprune.calibrate"
                   "'s cat_schedule (repo) or this script's rule (local: lower t0 until K >= --min-keep-frac N)")
    p.add_argument("--min-keep-frac", type=float, default=0.125, help="local rule: smallest K as a fraction of N")
    p.add_argument("--calib-budgets", default="0.5", help="budgets for the bucketed schedule (tokprune.calibrate.search"
                   ".realize, falling keep profile); '' to skip")
    p.add_argument("--calib-max-buckets", type=int, default=3, help="buckets of the calibrated schedule, dense included")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (fp32 with --tiny)")
    p.add_argument("--align", type=int, default=None, help="K multiple (default 64; 16 with --tiny)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 128; 32 with --tiny)")
    p.add_argument("--text-tokens", type=int, default=None, help="T (default 333; 32 with --tiny)")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--repeats", type=int, default=None, help="timed loops per mode (default 3; 2 with --tiny)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (debugging; default 24, 2 --tiny)")
    p.add_argument("--warmup-loops", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (with --tiny: run the bucket"
                   " wrapper eagerly)")
    p.add_argument("--compile", dest="force_compile", action="store_true", help="compile even with --tiny")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    p.add_argument("--compile-estimate", type=float, default=None, help="seconds assumed for the first bucket compile"
                   " (default 90; 60 with --tiny)")
    p.add_argument("--max-graphs", type=int, default=4, help="most pruned bucket graphs to compile (dense K=N included)")
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds; modes that would not fit are skipped")
    p.add_argument("--hard-grace", type=float, default=40.0, help="abort the running mode at time-budget + this")
    p.add_argument("--tol", type=float, default=1e-2, help="relative-error tolerance of the correctness guard")
    p.add_argument("--modes", default=None, help="comma list of substrings: run only matching modes")
    p.add_argument("--schedule", default=None, help="extra schedule to time: 'N*8,1024*20' or a JSON file")
    p.add_argument("--no-flop-check", action="store_true", help="skip the torch.utils.flop_counter check of the"
                   " analytic MAC counter (3 forwards with math SDPA)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    a.calib_budgets = [float(x) for x in a.calib_budgets.split(",") if x.strip()]
    a.dtype = a.dtype or ("float32" if a.tiny else "bfloat16")
    a.repeats = a.repeats or (2 if a.tiny else 3)
    a.align = a.align or (16 if a.tiny else 64)
    a.latent = a.latent or (32 if a.tiny else 128)
    a.text_tokens = a.text_tokens or (32 if a.tiny else 333)
    a.compile_estimate = a.compile_estimate or (60.0 if a.tiny else 90.0)
    if a.tiny and not a.force_compile:
        a.no_compile = True
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        import torch._dynamo.config as dcfg

        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, attr):
                setattr(dcfg, attr, 64)
    except Exception:  # noqa: BLE001
        pass
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: one thread beats two on a shared 2-core machine by ~2x

    def on_alarm(signum, frame):
        raise HardDeadline(f"hard deadline: {elapsed():.0f} s > time budget {args.time_budget} + {args.hard_grace}")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(args.time_budget + args.hard_grace))
    bench = Bench(args)
    log(f"command: {bench.res['command']}")
    try:
        bench.run()
    except BaseException as exc:  # noqa: BLE001
        bench.fail("top level", exc)
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    bench.save()
    table = bench.table()
    print("\n" + table, flush=True)
    log(f"wrote {bench.out_dir / 'gpu_results.json'} and {bench.out_dir / 'gpu_results.md'}")
    bad = bool(bench.res["errors"]) or not all(c["pass"] for c in bench.res["correctness"])
    log(f"exit code {3 if bad else 0} ({'errors or failed checks, see above' if bad else 'all modes ran, all checks pass'})")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3 if bad else 0)  # do not wait on compile worker pools at interpreter exit


if __name__ == "__main__":
    main()
