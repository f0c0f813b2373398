"""Train the yardstick: the VAE first, then the SD3 transformer (rectified flow); save a pipeline.

One command, time-limited, resumable::

    python -m tokprune.yardstick.train --out runs/shapes --device cuda --minutes 8 --pack-to $OUT
    python -m tokprune.yardstick.train --out /tmp/smoke --device cpu --smoke        # ~30 s check

``--minutes`` is the whole budget (set-up, VAE, transformer, final evaluation and saving;
time spent before a resume counts). Phases:

1. VAE (<= 10% of the budget, stops early once reconstructions check 100%): L1 + L2 + tiny KL;
   then the latent shift/scale are measured and written into the VAE config, as in SD3.
2. Transformer: SD3's objective. ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``,
   ``t`` logit-normal(0, 1) then shifted like the sampler (``shift`` in the model config),
   10% of captions dropped to "" (the pipeline's negative prompt) so guidance works. AdamW,
   warm-up then cosine to 10% over the time budget, EMA of weights, bf16 autocast and TF32
   on CUDA. Text encoders stay frozen.
3. Final: raw and EMA weights are each scored on held-out captions at a few guidance
   scales; the best is saved with ``save_pretrained`` to ``OUT/model`` (plus
   ``yardstick.json``), with ``OUT/training.json`` and a sample grid ``OUT/samples.png``.

A checkpoint (``OUT/checkpoint.pt``, written atomically) is kept every ``--ckpt-minutes`` and
when stopped by SIGINT/SIGTERM; rerunning the same command resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokprune.environment import device_name, versions
from tokprune.errors import ConfigError
from tokprune.fsutil import atomic_output
from tokprune.yardstick.checker import score
from tokprune.yardstick.dataset import (
    EVAL_SEED,
    TRAIN_SEED,
    render,
    sample_spec,
    scene_params,
    to_model_input,
    to_uint8,
)
from tokprune.yardstick.evaluate import evaluate, save_grid
from tokprune.yardstick.model import (
    PRESETS,
    ModelConfig,
    YardstickMeta,
    build_pipeline,
    count_parameters,
    save_pipeline,
)

logger = logging.getLogger(__name__)

CKPT_VERSION = 1


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run (recorded in training.json). ``None`` fields get device/smoke defaults."""

    out: str
    device: str = "cuda"
    minutes: float = 8.0  # whole budget, wall clock
    steps: int | None = None  # max transformer steps (None: as many as the time allows)
    vae_steps: int | None = None  # max VAE steps
    vae_minutes: float | None = None  # default: 10% of the budget, within [0.25, 1] min (stops early when good)
    batch: int | None = None  # transformer batch: 128 on CUDA
    vae_batch: int | None = None  # 64 on CUDA
    lr: float = 4e-4
    vae_lr: float = 1e-3
    warmup: int = 250
    ema: float = 0.999
    cfg_dropout: float = 0.1
    kl_weight: float = 1e-5
    seed: int = 0
    preset: str = "base"
    log_every: int | None = None
    ckpt_minutes: float = 3.0
    eval_n: int | None = None  # held-out captions per final evaluation
    eval_steps: int = 28
    guidances: tuple[float, ...] = (3.0, 5.0, 7.0)
    reserve_s: float | None = None  # budget kept for the final evaluation and saving
    pack_to: str | None = None
    compile: bool | None = None  # regional torch.compile of the transformer blocks; default on for CUDA
    amp: bool | None = None  # bf16 autocast; default on for CUDA
    workers: int | None = None  # DataLoader processes building batches; default min(6, cores - 2) on CUDA, 0 on CPU
    resume: bool = True
    smoke: bool = False

    def resolved(self) -> TrainConfig:
        cuda = self.device.startswith("cuda")
        smoke = self.smoke
        pick = lambda value, gpu, cpu, tiny: value if value is not None else (tiny if smoke else gpu if cuda else cpu)
        tc = dataclasses.replace(
            self,
            preset="smoke" if smoke else self.preset,
            steps=pick(self.steps, None, None, 4),
            vae_steps=pick(self.vae_steps, 20000, 20000, 4),
            batch=pick(self.batch, 128, 16, 4),
            vae_batch=pick(self.vae_batch, 64, 16, 4),
            log_every=pick(self.log_every, 100, 10, 1),
            eval_n=pick(self.eval_n, 128, 16, 4),
            eval_steps=2 if smoke else self.eval_steps,
            guidances=(3.0,) if smoke else tuple(self.guidances),
            reserve_s=pick(self.reserve_s, 45.0, 120.0, 20.0),
            amp=cuda if self.amp is None else self.amp,
            compile=cuda and not smoke if self.compile is None else self.compile,
            workers=pick(self.workers, min(6, max(1, (os.cpu_count() or 2) - 2)), 0, 0),
            warmup=2 if smoke else self.warmup,
        )
        if tc.preset not in PRESETS:
            raise ConfigError(f"--preset {tc.preset!r}; expected one of {tuple(PRESETS)}")
        if tc.minutes <= 0:
            raise ConfigError(f"--minutes {tc.minutes}; expected > 0")
        return tc


@dataclasses.dataclass
class RunState:
    """What a checkpoint carries besides weights: progress, time already spent, loss history."""

    phase: str = "vae"  # vae -> dit -> done
    vae_step: int = 0
    dit_step: int = 0
    elapsed: float = 0.0  # seconds of budget spent in earlier sessions
    vae_seconds: float = 0.0
    dit_seconds: float = 0.0
    dit_progress: float = 0.0  # position in the LR schedule, 0..1
    vae_history: list = dataclasses.field(default_factory=list)  # [step, loss, elapsed]
    dit_history: list = dataclasses.field(default_factory=list)  # [step, loss, elapsed]
    vae_recon: dict = dataclasses.field(default_factory=dict)
    latent_stats: dict = dataclasses.field(default_factory=dict)


class _Stop:
    """Context manager: SIGINT/SIGTERM set ``flag`` (loops then checkpoint and save); restores handlers."""

    def __init__(self) -> None:
        self.flag = False
        self._saved: dict = {}

    def _handler(self, signum, _frame) -> None:
        logger.warning("signal %d: stopping after this step, then saving (send again to kill)", signum)
        self.flag = True
        signal.signal(signum, self._saved.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)


class _Bar:
    """A tqdm bar over the phase's time budget (seconds), shown only on a terminal; log lines do the rest."""

    def __init__(self, desc: str, total_s: float):
        from tqdm import tqdm

        self._bar = tqdm(total=max(1, round(total_s)), desc=desc, unit="s", dynamic_ncols=True,
                         disable=not sys.stderr.isatty(), bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
        self._start = time.time()

    def update(self, **postfix) -> None:
        self._bar.n = min(self._bar.total, round(time.time() - self._start))
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self._bar.close()


class _BatchStream(torch.utils.data.IterableDataset):
    """Ready batches for consecutive steps of the train stream, built on CPU (in DataLoader workers).

    Each item: ``params`` (B, 3, 5) int32 scene parameters for :func:`render`, and with
    tokenizers also ``clip_ids`` (B, 77) / ``t5_ids`` (B, L) of the captions, a
    ``cfg_dropout`` share of them replaced by "" (the pipeline's negative prompt). Step ``s``
    always holds the same scenes and drops (seeded by ``seed, s``), however many workers.
    """

    def __init__(self, first_step: int, batch: int, offset: int = 0, tokenizers=None, max_sequence_length: int = 32,
                 cfg_dropout: float = 0.0, seed: int = 0):
        self.first_step, self.batch, self.offset = first_step, batch, offset
        self.tokenizers, self.max_sequence_length = tokenizers, max_sequence_length
        self.cfg_dropout, self.seed = cfg_dropout, seed

    def make(self, step: int) -> dict[str, torch.Tensor]:
        specs = [sample_spec(self.offset + step * self.batch + i, TRAIN_SEED) for i in range(self.batch)]
        item = {"params": scene_params(specs)}
        if self.tokenizers is not None:
            drop = np.random.default_rng([self.seed, step, 7]).random(self.batch) < self.cfg_dropout
            captions = ["" if d else s.caption for s, d in zip(specs, drop)]
            clip, t5 = self.tokenizers
            # Exactly the pipeline's tokenizer calls (StableDiffusion3Pipeline._get_clip/_get_t5_prompt_embeds).
            item["clip_ids"] = clip(captions, padding="max_length", max_length=clip.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
            item["t5_ids"] = t5(captions, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return item

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.first_step + worker
        while True:
            yield self.make(step)
            step += workers


def _batches(stream: _BatchStream, workers: int, pin_memory: bool = False):
    """Iterate a stream; with ``workers`` > 0 in worker processes (on CUDA the CPU work would stall the GPU)."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds (B, 77 + L, D), pooled (B, 2 * clip_hidden))`` from token ids.

    The model half of ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None: CLIP's
    penultimate hidden states, pooled text_embeds; CLIP padded to T5's width and put first),
    so tokenizing can happen in workers. Tested equal to ``encode_prompt``.
    """
    hidden, pooled = [], []
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        out = enc(clip_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)  # (B, 77, 2 * clip_hidden)
    t5 = pipe.text_encoder_3(t5_ids)[0]  # (B, L, D)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


# ----------------------------------------------------------------------------------------- helpers


def _autocast(tc: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(tc.amp))


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _fused_ok(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {}


def _compile_blocks(transformer, undo: bool = False) -> bool:
    """Regional compilation: ``torch.compile`` each JointTransformerBlock in place (one graph serves the
    identical blocks, so it compiles in well under a minute); ``undo`` restores eager calls.
    The state dict is untouched either way. Returns whether the blocks are now compiled."""
    for block in transformer.transformer_blocks:
        if undo:
            block._compiled_call_impl = None  # what nn.Module.compile sets; None = eager
        else:
            block.compile()
    return not undo


def _summarise(history: list, points: int = 40) -> list:
    if len(history) <= points:
        return history
    idx = np.linspace(0, len(history) - 1, points).round().astype(int)
    return [history[i] for i in sorted(set(idx.tolist()))]


# ----------------------------------------------------------------------------------------- phases


def _vae_recon_score(vae, tc: TrainConfig, device: torch.device) -> dict[str, float]:
    """Checker accuracy and MSE of VAE reconstructions of held-out images."""
    n = tc.eval_n
    vae.eval()
    specs = [sample_spec(i, EVAL_SEED) for i in range(n)]
    recon, mse = [], []
    with torch.no_grad(), _autocast(tc, device):
        for start in range(0, n, 64):
            x = to_model_input(render(specs[start : start + 64], device))
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
            mse.append(F.mse_loss(y, x).item())
            recon.append(to_uint8(y))
    vae.train()
    result = score(np.concatenate(recon), specs)
    result["mse"] = float(np.mean(mse))
    return result


def train_vae(pipe, tc: TrainConfig, state: RunState, clock, stop: _Stop, device, checkpoint) -> None:
    """Phase 1 (not resumable mid-way: it is short). Sets the VAE's shift/scale factors."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0, betas=(0.9, 0.99), **_fused_ok(device))
    vae_budget = 60.0 * (tc.vae_minutes if tc.vae_minutes is not None else min(1.0, max(0.25, 0.1 * tc.minutes)))
    eval_every = 250 if device.type == "cuda" else 100
    batches = _batches(_BatchStream(state.vae_step, tc.vae_batch, offset=10**9), tc.workers, device.type == "cuda")
    t_phase, s_phase, window = clock(), state.vae_step, []
    logger.info("vae: up to %d steps / %.0f s, batch %d", tc.vae_steps, vae_budget, tc.vae_batch)
    bar = _Bar("vae", vae_budget)
    try:
        while state.vae_step < tc.vae_steps and not stop.flag:
            if state.vae_seconds + (clock() - t_phase) >= vae_budget:
                break
            scene = next(batches)["params"]
            x = to_model_input(render(scene, device))
            with _autocast(tc, device):
                post = vae.encode(x).latent_dist
                y = vae.decode(post.sample()).sample.float()
            kl = post.kl().mean() / post.mean[0].numel()
            loss = F.l1_loss(y, x) + F.mse_loss(y, x) + tc.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            for g in opt.param_groups:
                g["lr"] = tc.vae_lr * min(1.0, (state.vae_step + 1) / 100)
            opt.step()
            state.vae_step += 1
            window.append(loss.detach())
            bar.update(step=state.vae_step)
            if state.vae_step % tc.log_every == 0:
                mean = torch.stack(window).mean().item()
                window.clear()
                state.vae_history.append([state.vae_step, round(mean, 5), round(clock(), 1)])
                rate = (state.vae_step - s_phase) / max(clock() - t_phase, 1e-6)
                logger.info("vae step %d | loss %.4f | %.1f step/s | %.0fs", state.vae_step, mean, rate, clock())
            if state.vae_step % eval_every == 0:
                rec = _vae_recon_score(vae, tc, device)
                logger.info("vae step %d | recon mse %.5f | checker mean %.3f image %.3f",
                            state.vae_step, rec["mse"], rec["mean"], rec["image"])
                if rec["image"] == 1.0 and rec["mse"] < 1.5e-3 and state.vae_step >= 2 * eval_every:
                    logger.info("vae: reconstructions check 100%%, stopping early")
                    break
    finally:
        bar.close()
        del batches  # stops the workers
    state.vae_seconds += clock() - t_phase
    vae.eval().requires_grad_(False)
    state.vae_recon = _vae_recon_score(vae, tc, device)
    # SD3 convention: latents = (z - shift_factor) * scaling_factor have zero mean, unit std.
    zs, (n_batches, size) = [], ((1, 8) if tc.smoke else (4, 64))
    with torch.no_grad(), _autocast(tc, device):
        for k in range(n_batches):
            x = to_model_input(render([sample_spec(10**8 + k * size + i) for i in range(size)], device))
            zs.append(vae.encode(x).latent_dist.sample().float())
    z = torch.cat(zs)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    state.latent_stats = {"shift_factor": shift, "scaling_factor": scale, "channel_std": z.std(dim=(0, 2, 3)).tolist()}
    logger.info("vae done: %d steps, %.0fs, recon %s, latent shift %.4f scale %.4f",
                state.vae_step, state.vae_seconds, {k: round(v, 4) for k, v in state.vae_recon.items()}, shift, scale)
    state.phase = "dit"
    checkpoint(None)


def train_dit(pipe, tc: TrainConfig, mcfg: ModelConfig, state: RunState, opt_state, ema, clock, stop, device,
              checkpoint) -> None:
    tr, vae = pipe.transformer, pipe.vae
    tr.train().requires_grad_(True)
    vae.eval().requires_grad_(False)
    params = [p for p in tr.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.99), **_fused_ok(device))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    compiled = _compile_blocks(tr) if tc.compile else False
    shift_f, scale_f = vae.config.shift_factor, vae.config.scaling_factor
    deadline = tc.minutes * 60.0 - tc.reserve_s  # on the run's clock (earlier sessions included)
    t_phase, seconds0, progress0 = clock(), state.dit_seconds, state.dit_progress
    span = max(deadline - t_phase, 1.0)  # time left for this phase: the LR schedule runs over it

    def progress() -> float:
        by_time = progress0 + (1.0 - progress0) * (clock() - t_phase) / span
        return max(by_time, state.dit_step / tc.steps if tc.steps else 0.0)

    def save(opt) -> None:
        state.dit_seconds, state.dit_progress = seconds0 + clock() - t_phase, min(progress(), 1.0)
        checkpoint(opt)

    last_ckpt, window, t_log, s_log = time.time(), [], clock(), state.dit_step
    clip_tok = pipe.tokenizer
    stream = _BatchStream(state.dit_step, tc.batch, tokenizers=(clip_tok, pipe.tokenizer_3),
                          max_sequence_length=mcfg.max_sequence_length, cfg_dropout=tc.cfg_dropout, seed=tc.seed)
    batches = _batches(stream, tc.workers, device.type == "cuda")
    logger.info("dit: batch %d, lr %.1e, until %s, %.0fs left", tc.batch, tc.lr,
                f"step {tc.steps}" if tc.steps else "time", deadline - clock())
    skipped = 0
    bar = _Bar("dit", deadline - clock())
    try:
        while not stop.flag:
            if tc.steps is not None and state.dit_step >= tc.steps:
                break
            if clock() >= deadline and not tc.smoke:  # a smoke run always does its few steps
                break
            item = next(batches)
            with torch.no_grad():
                x = to_model_input(render(item["params"], device))
                with _autocast(tc, device):
                    z = vae.encode(x).latent_dist.sample().float()
                z = (z - shift_f) * scale_f
                prompt_embeds, pooled = encode_text(pipe, item["clip_ids"].to(device, non_blocking=True),
                                                    item["t5_ids"].to(device, non_blocking=True))
                noise = torch.randn_like(z)
                t = torch.sigmoid(torch.randn(z.shape[0], device=device))  # logit-normal(0, 1)
                t = mcfg.shift * t / (1 + (mcfg.shift - 1) * t)  # same shift as the sampler's sigmas
                tb = t.view(-1, 1, 1, 1)
                x_t = (1 - tb) * z + tb * noise
            opt.zero_grad(set_to_none=True)
            try:
                with _autocast(tc, device):
                    pred = tr(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=prompt_embeds,
                              pooled_projections=pooled, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise - z)
                loss.backward()
            except Exception:  # a compiler failure must not cost the run: fall back to eager, redo the step
                if not compiled:
                    raise
                logger.exception("torch.compile failed; continuing eager")
                compiled = _compile_blocks(tr, undo=True)
                opt.zero_grad(set_to_none=True)
                with _autocast(tc, device):
                    pred = tr(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=prompt_embeds,
                              pooled_projections=pooled, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise - z)
                loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(gnorm):
                skipped += 1
                if skipped > 20:
                    raise FloatingPointError(f"20 non-finite gradients by step {state.dit_step}; lower --lr")
                continue
            factor = _lr_factor(state.dit_step, tc.warmup, progress())
            for g in opt.param_groups:
                g["lr"] = tc.lr * factor
            opt.step()
            decay = min(tc.ema, (1 + state.dit_step) / (10 + state.dit_step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            state.dit_step += 1
            window.append(loss.detach())
            if state.dit_step % 10 == 0:
                bar.update(step=state.dit_step, loss=f"{state.dit_history[-1][1]:.4f}" if state.dit_history else "-")
            if state.dit_step % tc.log_every == 0:
                mean = torch.stack(window).mean().item()
                window.clear()
                now = clock()
                rate = (state.dit_step - s_log) / max(now - t_log, 1e-6)
                t_log, s_log = now, state.dit_step
                state.dit_history.append([state.dit_step, round(mean, 5), round(now, 1)])
                logger.info("dit step %d | loss %.4f | %.2f step/s %.0f img/s | lr %.2e | gnorm %.2f | %.0fs / %.0fs",
                            state.dit_step, mean, rate, rate * tc.batch, opt.param_groups[0]["lr"], gnorm.item(),
                            now, tc.minutes * 60)
            if tc.ckpt_minutes > 0 and time.time() - last_ckpt >= tc.ckpt_minutes * 60:
                save(opt)
                last_ckpt = time.time()
    finally:
        bar.close()
        del batches
        if compiled:  # sampling runs eager: no recompiles for no-grad / other batch sizes
            _compile_blocks(tr, undo=True)
    save(opt)


# ----------------------------------------------------------------------------------------- main


def run(tc: TrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) and save; returns what is written to ``training.json``."""
    tc = tc.resolved()
    device = torch.device(tc.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = PRESETS[tc.preset]
    with _Stop() as stop:
        return _run(tc, device, out, mcfg, stop, argv)


def _run(tc: TrainConfig, device: torch.device, out: Path, mcfg: ModelConfig, stop: _Stop, argv) -> dict[str, Any]:
    ckpt_path = out / "checkpoint.pt"
    session_start = time.time()

    torch.manual_seed(tc.seed)
    pipe = build_pipeline(mcfg, tc.seed)
    pipe.set_progress_bar_config(disable=True)
    state, dit_opt = RunState(), None
    ema = None
    if tc.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("version") != CKPT_VERSION or ck.get("model_config") != dataclasses.asdict(mcfg):
            raise ConfigError(
                f"{ckpt_path} was written for another model config/version; use another --out or --no-resume"
            )
        state = RunState(**ck["state"])
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(pipe, name).load_state_dict(ck["weights"][name])
        pipe.vae.register_to_config(**ck.get("vae_config", {}))
        dit_opt, ema = ck.get("dit_opt"), ck.get("ema")
        torch.set_rng_state(ck["rng"]["cpu"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        logger.info("resumed %s: phase %s, vae step %d, dit step %d, %.0fs spent",
                    ckpt_path, state.phase, state.vae_step, state.dit_step, state.elapsed)
    pipe.to(device)
    ema = [e.to(device) for e in ema] if ema is not None else [p.detach().clone().float() for p in pipe.transformer.parameters()]
    elapsed0 = state.elapsed

    def clock() -> float:
        """Seconds of the budget spent so far, earlier sessions included."""
        return elapsed0 + time.time() - session_start

    def checkpoint(opt) -> None:
        nonlocal dit_opt
        if opt is not None:
            dit_opt = opt.state_dict()
        state.elapsed = clock()
        _atomic_save(
            {
                "version": CKPT_VERSION,
                "model_config": dataclasses.asdict(mcfg),
                "state": dataclasses.asdict(state),
                "weights": {n: getattr(pipe, n).state_dict() for n in
                            ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")},
                "vae_config": {"shift_factor": pipe.vae.config.shift_factor,
                               "scaling_factor": pipe.vae.config.scaling_factor},
                "ema": ema,
                "dit_opt": dit_opt,
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            },
            ckpt_path,
        )
        logger.info("checkpoint %s (phase %s, dit step %d)", ckpt_path, state.phase, state.dit_step)

    n_params = {n: count_parameters(getattr(pipe, n)) for n in
                ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    logger.info("device %s | %s", device_name(device), versions("diffusers", "transformers"))
    logger.info("model %s: %s params | image %dx%d -> latent %dx%dx%d -> %d image tokens + %d text tokens",
                tc.preset, n_params, 128, 128, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size,
                mcfg.image_tokens, mcfg.text_tokens)

    if state.phase == "done":  # resumed after the end: continue if --minutes / --steps allow more
        state.phase = "dit"
    if state.phase == "vae":
        train_vae(pipe, tc, state, clock, stop, device, checkpoint)
    if state.phase == "dit" and not stop.flag:
        train_dit(pipe, tc, mcfg, state, dit_opt, ema, clock, stop, device, checkpoint)
    return finish(pipe, tc, mcfg, state, ema, clock, device, n_params, argv, out)


def finish(pipe, tc, mcfg, state, ema, clock, device, n_params, argv, out: Path) -> dict[str, Any]:
    """Score EMA weights at each guidance and raw weights at the best of those; save the best; write training.json."""
    tr = pipe.transformer.eval()
    params = list(tr.parameters())
    raw = [p.detach().clone() for p in params]
    t0 = clock()
    results, best = {}, None
    batch = 64 if device.type == "cuda" else 8

    def trial(which: str, g: float) -> None:
        nonlocal best
        with torch.no_grad():
            for p, w in zip(params, ema if which == "ema" else raw):
                p.copy_(w)
        r = evaluate(pipe, n=tc.eval_n, steps=tc.eval_steps, guidance=g, seed=0, batch_size=batch,
                     max_sequence_length=mcfg.max_sequence_length, return_images=True)
        images = r.pop("images")
        r.pop("captions")
        results[f"{which}@{g:g}"] = r
        logger.info("eval %s guidance %g: mean %.3f (pos %.3f col %.3f shape %.3f size %.3f) image %.3f, %.1fs",
                    which, g, r["mean"], r["position"], r["colour"], r["shape"], r["size"], r["image"], r["seconds"])
        key = (r["mean"], r["image"], which == "ema")
        if best is None or key > best[0]:
            best = (key, which, g, images)

    for g in tc.guidances:
        trial("ema", g)
    trial("raw", best[2])
    _, which, guidance, images = best
    with torch.no_grad():
        for p, w in zip(params, ema if which == "ema" else raw):
            p.copy_(w)
    model_dir = out / "model"
    meta = YardstickMeta(
        max_sequence_length=mcfg.max_sequence_length,
        num_inference_steps=28,
        guidance_scale=float(guidance),
        config=dataclasses.asdict(mcfg),
    )
    save_pipeline(pipe, model_dir, meta)
    save_grid(images[:32], out / "samples.png")
    state.phase = "done"
    dit_rate = state.dit_step / state.dit_seconds if state.dit_seconds > 0 else None
    report = {
        "command": "python -m tokprune.yardstick.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "config": dataclasses.asdict(tc),
        "model_config": dataclasses.asdict(mcfg),
        "parameters": n_params,
        "tokens": {"image": mcfg.image_tokens, "text": mcfg.text_tokens,
                   "latent": [mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size], "image_px": 128},
        "device": device_name(device),
        "versions": versions("diffusers", "transformers"),
        "vae": {"steps": state.vae_step, "seconds": round(state.vae_seconds, 1), "recon": state.vae_recon,
                "latent_stats": state.latent_stats, "loss_curve": _summarise(state.vae_history)},
        "transformer": {
            "steps": state.dit_step,
            "seconds": round(state.dit_seconds, 1),
            "steps_per_s": round(dit_rate, 3) if dit_rate else None,
            "images_seen": state.dit_step * tc.batch,
            "final_loss": state.dit_history[-1][1] if state.dit_history else None,
            "loss_curve": _summarise(state.dit_history),
        },
        "eval": results,
        "chosen": {"weights": which, "guidance": guidance, **{k: results[f"{which}@{guidance:g}"][k]
                                                              for k in ("mean", "position", "colour", "shape", "size", "image")}},
        "final_seconds": round(clock() - t0, 1),
        "total_seconds": round(clock(), 1),
        "model_dir": str(model_dir),
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "training.json").write_text(text)
    (model_dir / "training.json").write_text(text)
    logger.info("saved %s (weights %s, guidance %g, eval mean %.3f) in %.0fs total",
                model_dir, which, guidance, report["chosen"]["mean"], clock())
    if tc.pack_to:
        from tokprune.yardstick.pack import pack

        dest = Path(tc.pack_to)
        pack(model_dir, dest)
        (dest / "training.json").write_text(text)
        if (out / "samples.png").is_file():
            (dest / "samples.png").write_bytes((out / "samples.png").read_bytes())
    return report


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m tokprune.yardstick.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="run directory: checkpoint.pt, training.json, model/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--minutes", type=float, default=None, help="whole wall-clock budget (default 8; smoke 0.5)")
    ap.add_argument("--steps", type=int, default=None, help="max transformer steps (default: time-limited)")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--vae-minutes", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None, help="transformer batch (default 128 on cuda)")
    ap.add_argument("--vae-batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint interval (0: only at phase ends)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out captions per final evaluation (default 128)")
    ap.add_argument("--guidances", type=float, nargs="+", default=[3.0, 5.0, 7.0])
    ap.add_argument("--pack-to", default=None, help="also write model.tar.part-* (<=15 MiB each), training.json, "
                                                   "samples.png here (e.g. a device's $OUT)")
    ap.add_argument("--workers", type=int, default=None, help="batch-building processes (default 6 on cuda, 0 on cpu)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="torch.compile each transformer block (default on cuda; ~45 s to compile, ~2x faster steps)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="train eager")
    ap.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="disable bf16 autocast")
    ap.add_argument("--amp", dest="amp", action="store_true", help="bf16 autocast (default on cuda)")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps: checks the whole path")
    a = ap.parse_args(argv)
    return TrainConfig(
        out=a.out, device=a.device, minutes=a.minutes if a.minutes is not None else (0.5 if a.smoke else 8.0),
        steps=a.steps, vae_steps=a.vae_steps, vae_minutes=a.vae_minutes, batch=a.batch, vae_batch=a.vae_batch,
        lr=a.lr, seed=a.seed, preset=a.preset, log_every=a.log_every, ckpt_minutes=a.ckpt_minutes, eval_n=a.eval_n,
        guidances=tuple(a.guidances), pack_to=a.pack_to, compile=a.compile, amp=a.amp, resume=a.resume, workers=a.workers,
        smoke=a.smoke,
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batches are tokenized in forked workers
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = argv if argv is not None else sys.argv[1:]
    report = run(parse_args(args), args)
    print(json.dumps({"model_dir": report["model_dir"], "chosen": report["chosen"],
                      "transformer_steps": report["transformer"]["steps"], "total_seconds": report["total_seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
