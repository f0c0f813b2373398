"""The two training phases of the yardstick: the VAE (:func:`train_vae`), then the SD3 transformer with
SD3's rectified-flow objective (:func:`train_dit`); each runs to its share of the time budget, logs,
checkpoints through the callback it is given and stops early when asked (``stop.flag``).

:mod:`tokprune.yardstick.train` sets up the run, resumes it and calls these; see its docstring for the
objective and the schedule.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokprune.yardstick.checker import score
from tokprune.yardstick.dataset import EVAL_SEED, render, sample_spec, to_model_input, to_uint8
from tokprune.yardstick.model import ModelConfig
from tokprune.yardstick.train_config import RunState, TrainConfig
from tokprune.yardstick.train_data import BatchStream, batches, encode_text

__all__ = ["train_dit", "train_vae"]

logger = logging.getLogger(__name__)


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


def _autocast(tc: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(tc.amp))


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


# ----------------------------------------------------------------------------------------- phases


class OptimStep:
    """One optimiser step of a yardstick transformer, shared by the SD3 and PixArt training loops.

    ``step(loss_fn, progress)`` zeroes the gradients, runs ``loss_fn()`` (forward + backward, returns its
    losses), and if ``torch.compile`` fails inside it, undoes the compile and redoes the step eagerly (a
    compiler failure must not cost the run). Then it clips the gradient norm to 1, skips a step whose norm
    is not finite (more than 20 such steps raise), sets the warm-up + cosine learning rate, steps and
    updates the EMA weights. Returns the losses, or None for a skipped step; ``gnorm`` and ``compiled``
    hold the last norm and whether the blocks are still compiled.
    """

    def __init__(self, tr, opt, params, ema, tc: TrainConfig, state: RunState, compiled: bool) -> None:
        self.tr, self.opt, self.params, self.ema, self.tc, self.state = tr, opt, params, ema, tc, state
        self.compiled, self.skipped, self.gnorm = compiled, 0, torch.zeros(())

    def step(self, loss_fn, progress: float):
        self.opt.zero_grad(set_to_none=True)
        try:
            losses = loss_fn()
        except Exception:
            if not self.compiled:
                raise
            logger.exception("torch.compile failed; continuing eager")
            self.compiled = _compile_blocks(self.tr, undo=True)
            self.opt.zero_grad(set_to_none=True)
            losses = loss_fn()
        self.gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if not torch.isfinite(self.gnorm):
            self.skipped += 1
            if self.skipped > 20:
                raise FloatingPointError(f"20 non-finite gradients by step {self.state.dit_step}; lower --lr")
            return None
        for g in self.opt.param_groups:
            g["lr"] = self.tc.lr * _lr_factor(self.state.dit_step, self.tc.warmup, progress)
        self.opt.step()
        decay = min(self.tc.ema, (1 + self.state.dit_step) / (10 + self.state.dit_step))
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.state.dit_step += 1
        return losses


def pick_final_weights(pipe, tc: TrainConfig, max_sequence_length: int, ema, clock, device) -> tuple[dict, str, float, Any]:
    """Score the EMA weights at each of ``tc.guidances`` and the raw weights at the best of those; load the best.

    Shared by the SD3 and PixArt trainings. An evaluation that would overrun ``tc.minutes`` on the run's
    ``clock`` is skipped (the first always runs). Returns ``(results, which, guidance, images)``: every
    evaluation's scores by ``"ema@g"`` / ``"raw@g"``, the chosen weights (``"ema"`` / ``"raw"``) and
    guidance, and the chosen evaluation's images; the transformer holds the chosen weights.
    """
    from tokprune.yardstick.evaluate import evaluate

    params = list(pipe.transformer.eval().parameters())
    raw = [p.detach().clone() for p in params]
    results: dict[str, dict] = {}
    best: Any = None
    batch = 64 if device.type == "cuda" else 8

    def load(which: str) -> None:
        with torch.no_grad():
            for p, w in zip(params, ema if which == "ema" else raw):
                p.copy_(w)

    def trial(which: str, g: float) -> None:
        nonlocal best
        load(which)
        r = evaluate(pipe, n=tc.eval_n, steps=tc.eval_steps, guidance=g, seed=0, batch_size=batch,
                     max_sequence_length=max_sequence_length, return_images=True)
        images = r.pop("images")
        r.pop("captions")
        results[f"{which}@{g:g}"] = r
        logger.info("eval %s guidance %g: mean %.3f (pos %.3f col %.3f shape %.3f size %.3f) image %.3f, %.1fs",
                    which, g, r["mean"], r["position"], r["colour"], r["shape"], r["size"], r["image"], r["seconds"])
        key = (r["mean"], r["image"], which == "ema")
        if best is None or key > best[0]:
            best = (key, which, g, images)

    def fits() -> bool:
        if not results:
            return True
        last = max(r["seconds"] for r in results.values())
        ok = tc.smoke or clock() + 1.2 * last + 5.0 <= tc.minutes * 60.0
        if not ok:
            logger.warning("final evaluation: skipping the rest (%.0fs of %.0fs spent, %.0fs an evaluation)",
                           clock(), tc.minutes * 60.0, last)
        return ok

    for g in tc.guidances:
        if fits():
            trial("ema", g)
    if fits():
        trial("raw", best[2])
    _, which, guidance, images = best
    load(which)
    return results, which, float(guidance), images


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


def train_vae(pipe, tc: TrainConfig, state: RunState, clock, stop, device, checkpoint) -> None:
    """Phase 1 (not resumable mid-way: it is short). Sets the VAE's shift/scale factors."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=0.0, betas=(0.9, 0.99), **_fused_ok(device))
    vae_budget = 60.0 * (tc.vae_minutes if tc.vae_minutes is not None else min(1.0, max(0.25, 0.1 * tc.minutes)))
    eval_every = 250 if device.type == "cuda" else 100
    items = batches(BatchStream(state.vae_step, tc.vae_batch, offset=10**9), tc.workers, device.type == "cuda")
    t_phase, s_phase, window = clock(), state.vae_step, []
    logger.info("vae: up to %d steps / %.0f s, batch %d", tc.vae_steps, vae_budget, tc.vae_batch)
    bar = _Bar("vae", vae_budget)
    try:
        while state.vae_step < tc.vae_steps and not stop.flag:
            if state.vae_seconds + (clock() - t_phase) >= vae_budget:
                break
            scene = next(items)["params"]
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
        del items  # stops the workers
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
    stepper = OptimStep(tr, opt, params, ema, tc, state, _compile_blocks(tr) if tc.compile else False)
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
    stream = BatchStream(state.dit_step, tc.batch, tokenizers=(clip_tok, pipe.tokenizer_3),
                          max_sequence_length=mcfg.max_sequence_length, cfg_dropout=tc.cfg_dropout, seed=tc.seed)
    items = batches(stream, tc.workers, device.type == "cuda")
    logger.info("dit: batch %d, lr %.1e, until %s, %.0fs left", tc.batch, tc.lr,
                f"step {tc.steps}" if tc.steps else "time", deadline - clock())
    bar = _Bar("dit", deadline - clock())
    try:
        while not stop.flag:
            if tc.steps is not None and state.dit_step >= tc.steps:
                break
            if clock() >= deadline and not tc.smoke:  # a smoke run always does its few steps
                break
            item = next(items)
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
            def loss_fn():
                with _autocast(tc, device):
                    pred = tr(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=prompt_embeds,
                              pooled_projections=pooled, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise - z)
                loss.backward()
                return loss

            loss = stepper.step(loss_fn, progress())
            if loss is None:
                continue
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
                            state.dit_step, mean, rate, rate * tc.batch, opt.param_groups[0]["lr"], stepper.gnorm.item(),
                            now, tc.minutes * 60)
            if tc.ckpt_minutes > 0 and time.time() - last_ckpt >= tc.ckpt_minutes * 60:
                save(opt)
                last_ckpt = time.time()
    finally:
        bar.close()
        del items
        if stepper.compiled:  # sampling runs eager: no recompiles for no-grad / other batch sizes
            _compile_blocks(tr, undo=True)
    save(opt)
