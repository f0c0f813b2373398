"""Train the PixArt-architecture yardstick (``--arch pixart``): only the transformer, on the shapes VAE's latents.

The SD3 recipe of :mod:`tokprune.yardstick.train`, with PixArt-Σ's objective instead of rectified flow::

    python -m tokprune.yardstick.train --arch pixart --out runs/pix --device cuda --minutes 4 --pack-to $OUT/pix
    python -m tokprune.yardstick.train --arch pixart --out /tmp/pix --device cpu --smoke     # seconds

- no VAE phase: the trained ``shapes`` VAE is reused (:mod:`tokprune.yardstick.pixart_model`);
- the text encoder (small random T5) stays frozen, as in the SD3 recipe;
- objective: DDPM over PixArt-Σ's linear betas (1000 steps), ``t`` uniform, epsilon prediction (MSE),
  plus IDDPM's variational bound on the learned-sigma half with the mean detached (how PixArt trains
  its ``learn_sigma`` output; the KL form is used at ``t = 0`` too); 10% of captions dropped to "" (the
  pipeline's negative prompt); AdamW, warm-up then cosine over the time budget, EMA, bf16 autocast,
  regional ``torch.compile`` on CUDA; checkpoint every ``--ckpt-minutes`` and on SIGINT/SIGTERM, resumed
  by re-running the command;
- final: EMA at each guidance, raw at the best, scored on held-out captions (sampled by the pipeline's
  own DPM-Solver++, 28 steps); the best is saved to ``OUT/model`` (with ``training.json`` and
  ``samples.png`` inside, so ``--pack-to`` writes only ``model.tar.part-*`` and ``model.tar.sha256``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokprune.environment import device_name, versions
from tokprune.errors import ConfigError
from tokprune.yardstick.dataset import TRAIN_SEED, render, sample_spec, scene_params, to_model_input
from tokprune.yardstick.evaluate import save_grid
from tokprune.yardstick.model import YardstickMeta, count_parameters, save_pipeline
from tokprune.yardstick.pixart_model import PIXART_PRESETS, PixArtShapesConfig, build_pipeline
from tokprune.yardstick.train_config import CKPT_VERSION, RunState, TrainConfig
from tokprune.yardstick.train_data import StepStream, batches
from tokprune.yardstick.train_loop import pick_final_weights

__all__ = ["PixArtBatchStream", "diffusion_loss", "run_pixart"]

logger = logging.getLogger(__name__)

PARTS = ("transformer", "text_encoder")


class PixArtBatchStream(StepStream):
    """Batches for consecutive steps: scene ``params`` and the T5 ``ids`` / ``mask`` of the captions,
    tokenized exactly as ``PixArtSigmaPipeline.encode_prompt`` does; a ``cfg_dropout`` share is ""."""

    def __init__(self, first_step: int, batch: int, tokenizer, max_sequence_length: int, cfg_dropout: float, seed: int):
        self.first_step, self.batch, self.tokenizer = first_step, batch, tokenizer
        self.max_sequence_length, self.cfg_dropout, self.seed = max_sequence_length, cfg_dropout, seed

    def make(self, step: int) -> dict[str, torch.Tensor]:
        specs = [sample_spec(step * self.batch + i, TRAIN_SEED) for i in range(self.batch)]
        drop = np.random.default_rng([self.seed, step, 7]).random(self.batch) < self.cfg_dropout
        captions = ["" if d else s.caption for s, d in zip(specs, drop)]
        tok = self.tokenizer(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return {"params": scene_params(specs), "ids": tok.input_ids, "mask": tok.attention_mask}


class _Schedule:
    """PixArt-Σ's training diffusion (the scheduler's betas) as tensors on ``device``, float64 -> float32."""

    def __init__(self, scheduler, device: torch.device):
        betas = scheduler.betas.double()
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        f = lambda x: x.float().to(device)  # noqa: E731
        self.n = len(betas)
        self.sqrt_ab, self.sqrt_1mab = f(ab.sqrt()), f((1 - ab).sqrt())
        self.log_beta = f(betas.log())
        self.post_log_var = f(torch.cat([post_var[1:2], post_var[1:]]).log())  # clipped at t = 0, as IDDPM
        # true_mean - model_mean = coef * (eps_pred - eps): coef1 * sqrt(1 - ab) / sqrt(ab) = beta / (sqrt(alpha) sqrt(1 - ab))
        self.mean_coef = f(betas / ((1 - betas).sqrt() * (1 - ab).sqrt()))


def diffusion_loss(pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sched: _Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mse, vb)``: epsilon MSE, and with learned sigma (``pred`` has 2C channels) IDDPM's KL of
    q(x_{t-1} | x_t, x_0) to the model's Gaussian, mean detached (bits per dimension)."""
    pred = pred.float()
    c = noise.shape[1]
    eps = pred[:, :c]
    mse = F.mse_loss(eps, noise)
    if pred.shape[1] == c:
        return mse, mse.new_zeros(())
    v = pred[:, c:]
    view = lambda x: x[t].view(-1, 1, 1, 1)  # noqa: E731
    true_log_var = view(sched.post_log_var)
    frac = (v + 1) / 2
    model_log_var = frac * view(sched.log_beta) + (1 - frac) * true_log_var
    diff = view(sched.mean_coef) * (eps.detach() - noise)
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + diff.square() * torch.exp(-model_log_var))
    vb = kl.mean(dim=(1, 2, 3)) / np.log(2.0) * (sched.n / 1000.0)
    return mse, vb.mean()


def run_pixart(tc: TrainConfig, argv: list[str] | None, stop) -> dict[str, Any]:
    """Train (or resume) the PixArt yardstick and save it; returns what is written to ``training.json``."""
    from tokprune.yardstick.train import _atomic_save, budget_clock, ema_weights, restore_rng, rng_states

    device = torch.device(tc.device)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = PIXART_PRESETS[tc.preset]
    ckpt_path = out / "checkpoint.pt"
    session_start = time.time()
    torch.manual_seed(tc.seed)
    pipe = build_pipeline(mcfg, tc.seed)
    state, opt_state, ema = RunState(phase="dit"), None, None
    if tc.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("version") != CKPT_VERSION or ck.get("model_config") != dataclasses.asdict(mcfg) or ck.get("arch") != "pixart":
            raise ConfigError(f"{ckpt_path} was written for another model/arch/version; use another --out or --no-resume")
        state = RunState(**ck["state"])
        for name in PARTS:
            getattr(pipe, name).load_state_dict(ck["weights"][name])
        opt_state, ema = ck.get("dit_opt"), ck.get("ema")
        restore_rng(ck["rng"], device)
        logger.info("resumed %s: dit step %d, %.0fs spent", ckpt_path, state.dit_step, state.elapsed)
    pipe.to(device)
    ema = ema_weights(ema, pipe.transformer, device)
    clock = budget_clock(state.elapsed, session_start)

    def checkpoint(opt_sd) -> None:
        state.elapsed = clock()
        _atomic_save({
            "version": CKPT_VERSION, "arch": "pixart", "model_config": dataclasses.asdict(mcfg),
            "state": dataclasses.asdict(state),
            "weights": {n: getattr(pipe, n).state_dict() for n in PARTS},
            "ema": ema, "dit_opt": opt_sd,
            "rng": rng_states(device),
        }, ckpt_path)  # fmt: skip
        logger.info("checkpoint %s (dit step %d)", ckpt_path, state.dit_step)

    n_params = {n: count_parameters(getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder")}
    logger.info("device %s | %s", device_name(device), versions("diffusers", "transformers"))
    logger.info("pixart model %s: %s params | 128x128 -> latent 4x%dx%d -> %d image tokens + %d text tokens",
                tc.preset, n_params, mcfg.latent_size, mcfg.latent_size, mcfg.image_tokens, mcfg.text_tokens)
    if not stop.flag:
        _train(pipe, tc, mcfg, state, opt_state, ema, clock, stop, device, checkpoint)
    return _finish(pipe, tc, mcfg, state, ema, clock, device, n_params, argv, out)


def _train(pipe, tc: TrainConfig, mcfg: PixArtShapesConfig, state: RunState, opt_state, ema, clock, stop, device,
           checkpoint) -> None:
    from tokprune.yardstick.train_loop import OptimStep, _Bar, _autocast, _compile_blocks, _fused_ok

    tr, vae, te = pipe.transformer, pipe.vae, pipe.text_encoder
    tr.train().requires_grad_(True)
    params = list(tr.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.99), **_fused_ok(device))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    stepper = OptimStep(tr, opt, params, ema, tc, state, _compile_blocks(tr) if tc.compile else False)
    sched = _Schedule(pipe.scheduler, device)
    scale = float(vae.config.scaling_factor)
    deadline = tc.minutes * 60.0 - tc.reserve_s
    t_phase, seconds0, progress0 = clock(), state.dit_seconds, state.dit_progress
    span = max(deadline - t_phase, 1.0)

    def progress() -> float:
        by_time = progress0 + (1.0 - progress0) * (clock() - t_phase) / span
        return max(by_time, state.dit_step / tc.steps if tc.steps else 0.0)

    def save() -> None:
        state.dit_seconds, state.dit_progress = seconds0 + clock() - t_phase, min(progress(), 1.0)
        checkpoint(opt.state_dict())

    stream = PixArtBatchStream(state.dit_step, tc.batch, pipe.tokenizer, mcfg.max_sequence_length, tc.cfg_dropout, tc.seed)
    items = batches(stream, tc.workers, device.type == "cuda")
    logger.info("pixart dit: batch %d, lr %.1e, until %s, %.0fs left", tc.batch, tc.lr,
                f"step {tc.steps}" if tc.steps else "time", deadline - clock())
    last_ckpt, window, t_log, s_log = time.time(), [], clock(), state.dit_step
    no_cond = {"resolution": None, "aspect_ratio": None}

    def forward(x_t, t, emb, mask):
        with _autocast(tc, device):
            return tr(x_t, encoder_hidden_states=emb, timestep=t, added_cond_kwargs=no_cond,
                      encoder_attention_mask=mask, return_dict=False)[0]

    bar = _Bar("pixart", deadline - clock())
    try:
        while not stop.flag:
            if tc.steps is not None and state.dit_step >= tc.steps:
                break
            if clock() >= deadline and not tc.smoke:
                break
            item = next(items)
            with torch.no_grad():
                x = to_model_input(render(item["params"], device))
                with _autocast(tc, device):
                    z = vae.encode(x).latent_dist.sample().float() * scale
                ids, mask = item["ids"].to(device, non_blocking=True), item["mask"].to(device, non_blocking=True)
                emb = te(ids, attention_mask=mask)[0]
                t = torch.randint(0, sched.n, (z.shape[0],), device=device)
                noise = torch.randn_like(z)
                x_t = sched.sqrt_ab[t].view(-1, 1, 1, 1) * z + sched.sqrt_1mab[t].view(-1, 1, 1, 1) * noise
            def loss_fn():
                mse, vb = diffusion_loss(forward(x_t, t, emb, mask), noise, t, sched)
                (mse + vb).backward()
                return mse, vb

            losses = stepper.step(loss_fn, progress())
            if losses is None:
                continue
            mse, vb = losses
            window.append(torch.stack([mse.detach(), vb.detach()]))
            if state.dit_step % 10 == 0:
                bar.update(step=state.dit_step)
            if state.dit_step % tc.log_every == 0:
                m_mse, m_vb = torch.stack(window).mean(0).tolist()
                window.clear()
                now = clock()
                rate = (state.dit_step - s_log) / max(now - t_log, 1e-6)
                t_log, s_log = now, state.dit_step
                state.dit_history.append([state.dit_step, round(m_mse, 5), round(now, 1), round(m_vb, 5)])
                logger.info("pixart step %d | mse %.4f vb %.4f | %.2f step/s %.0f img/s | lr %.2e | gnorm %.2f | %.0fs / %.0fs",
                            state.dit_step, m_mse, m_vb, rate, rate * tc.batch, opt.param_groups[0]["lr"], stepper.gnorm.item(),
                            now, tc.minutes * 60)
            if tc.ckpt_minutes > 0 and time.time() - last_ckpt >= tc.ckpt_minutes * 60:
                save()
                last_ckpt = time.time()
    finally:
        bar.close()
        del items
        if stepper.compiled:
            _compile_blocks(tr, undo=True)
    save()


def _finish(pipe, tc: TrainConfig, mcfg: PixArtShapesConfig, state: RunState, ema, clock, device, n_params, argv,
            out: Path) -> dict[str, Any]:
    """Score EMA at each guidance and raw at the best; save the best with training.json and samples.png inside."""
    from tokprune.yardstick.train import _summarise, report_head, report_tail, write_report

    t0 = clock()
    results, which, guidance, images = pick_final_weights(pipe, tc, mcfg.max_sequence_length, ema, clock, device)
    model_dir = out / "model"
    meta = YardstickMeta(max_sequence_length=mcfg.max_sequence_length, num_inference_steps=28,
                         guidance_scale=float(guidance), config={"arch": "pixart", **dataclasses.asdict(mcfg)})
    save_pipeline(pipe, model_dir, meta)
    save_grid(images[:32], model_dir / "samples.png")
    state.phase = "done"
    rate = state.dit_step / state.dit_seconds if state.dit_seconds > 0 else None
    report = {
        "arch": "pixart",
        **report_head(tc, mcfg, n_params, device, argv),
        "vae": {"reused": "yardstick/weights/shapes/vae", "shift_factor": 0.0,
                "scaling_factor": float(pipe.vae.config.scaling_factor)},
        "objective": "DDPM eps-MSE + IDDPM VLB on the learned sigma (mean detached), PixArt-Sigma linear betas",
        "transformer": {
            "steps": state.dit_step, "seconds": round(state.dit_seconds, 1),
            "steps_per_s": round(rate, 3) if rate else None, "images_seen": state.dit_step * tc.batch,
            "final_mse": state.dit_history[-1][1] if state.dit_history else None,
            "loss_curve": _summarise(state.dit_history),  # [step, mse, elapsed s, vb]
        },
        **report_tail(results, which, guidance, clock, t0, model_dir),
    }  # fmt: skip
    write_report(report, out, model_dir, clock)
    if tc.pack_to:
        from tokprune.yardstick.pack import pack

        pack(model_dir, tc.pack_to)  # training.json and samples.png travel inside the tar
    return report
