"""Train the yardstick: the VAE first, then the SD3 transformer (rectified flow); save a pipeline.

One command, time-limited, resumable::

    python -m tokprune.yardstick.train --out runs/shapes --device cuda --minutes 8 --pack-to $OUT
    python -m tokprune.yardstick.train --out /tmp/smoke --device cpu --smoke        # ~30 s check
    python -m tokprune.yardstick.train --arch pixart --out /tmp/pix --device cuda --minutes 4 --pack-to $OUT/pix

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

from tokprune.environment import device_name, versions
from tokprune.console import add_common, run_cli
from tokprune.errors import ConfigError
from tokprune.fsutil import atomic_output, atomic_write_text
from tokprune.yardstick.evaluate import save_grid
from tokprune.yardstick.model import PRESETS, ModelConfig, YardstickMeta, build_pipeline, count_parameters, save_pipeline
from tokprune.yardstick.train_config import CKPT_VERSION, RunState, TrainConfig
from tokprune.yardstick.train_loop import pick_final_weights, train_dit, train_vae

__all__ = ["TrainConfig", "main", "parse_args", "run"]

logger = logging.getLogger(__name__)


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


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def budget_clock(spent_before: float, session_start: float):
    """A clock of the ``--minutes`` budget: seconds spent so far, earlier (resumed) sessions included."""
    return lambda: spent_before + time.time() - session_start


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random generators' states a checkpoint keeps (CPU, and CUDA on a GPU)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_states` saved."""
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])


def ema_weights(ema: list[torch.Tensor] | None, transformer: torch.nn.Module, device: torch.device) -> list[torch.Tensor]:
    """The EMA weights on ``device``: a checkpoint's, else a float copy of the transformer's (on ``device``)."""
    if ema is not None:
        return [e.to(device) for e in ema]
    return [p.detach().clone().float() for p in transformer.parameters()]


def _summarise(history: list, points: int = 40) -> list:
    if len(history) <= points:
        return history
    idx = np.linspace(0, len(history) - 1, points).round().astype(int)
    return [history[i] for i in sorted(set(idx.tolist()))]


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
    if tc.arch == "pixart":
        from tokprune.yardstick.pixart_train import run_pixart

        with _Stop() as stop:
            return run_pixart(tc, argv, stop)
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
        restore_rng(ck["rng"], device)
        logger.info("resumed %s: phase %s, vae step %d, dit step %d, %.0fs spent",
                    ckpt_path, state.phase, state.vae_step, state.dit_step, state.elapsed)
    pipe.to(device)
    ema = ema_weights(ema, pipe.transformer, device)
    clock = budget_clock(state.elapsed, session_start)

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
                "rng": rng_states(device),
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


def report_head(tc, mcfg, n_params: dict, device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    """The fields of ``training.json`` that every yardstick training writes first (command, configs, sizes, device)."""
    return {
        "command": "python -m tokprune.yardstick.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "config": dataclasses.asdict(tc),
        "model_config": dataclasses.asdict(mcfg),
        "parameters": n_params,
        "tokens": {"image": mcfg.image_tokens, "text": mcfg.text_tokens,
                   "latent": [mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size], "image_px": 128},
        "device": device_name(device),
        "versions": versions("diffusers", "transformers"),
    }


def report_tail(results: dict, which: str, guidance: float, clock, t0: float, model_dir: Path) -> dict[str, Any]:
    """The fields of ``training.json`` about the final pick (:func:`pick_final_weights`) and the time spent."""
    chosen = results[f"{which}@{guidance:g}"]
    return {
        "eval": results,
        "chosen": {"weights": which, "guidance": guidance,
                   **{k: chosen[k] for k in ("mean", "position", "colour", "shape", "size", "image")}},
        "final_seconds": round(clock() - t0, 1),
        "total_seconds": round(clock(), 1),
        "model_dir": str(model_dir),
    }


def write_report(report: dict[str, Any], out: Path, model_dir: Path, clock) -> str:
    """``training.json`` in the run folder and in the model folder (atomically); returns its text."""
    text = json.dumps(report, indent=2) + "\n"
    atomic_write_text(out / "training.json", text)
    atomic_write_text(model_dir / "training.json", text)
    logger.info("saved %s (weights %s, guidance %g, eval mean %.3f) in %.0fs total", model_dir,
                report["chosen"]["weights"], report["chosen"]["guidance"], report["chosen"]["mean"], clock())
    return text


def finish(pipe, tc, mcfg, state, ema, clock, device, n_params, argv, out: Path) -> dict[str, Any]:
    """Score EMA weights at each guidance and raw weights at the best of those; save the best; write training.json."""
    t0 = clock()
    results, which, guidance, images = pick_final_weights(pipe, tc, mcfg.max_sequence_length, ema, clock, device)
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
        **report_head(tc, mcfg, n_params, device, argv),
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
        **report_tail(results, which, guidance, clock, t0, model_dir),
    }
    text = write_report(report, out, model_dir, clock)
    if tc.pack_to:
        from tokprune.yardstick.pack import pack

        dest = Path(tc.pack_to)
        pack(model_dir, dest)
        atomic_write_text(dest / "training.json", text)
        if (out / "samples.png").is_file():
            (dest / "samples.png").write_bytes((out / "samples.png").read_bytes())
    return report


def build_parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--arch", default="sd3", choices=["sd3", "pixart"],
                    help="sd3: the shapes model (VAE + SD3 transformer); pixart: a PixArt-Σ-architecture transformer "
                         "on the shipped shapes VAE (tokprune.yardstick.pixart_train)")
    ap.add_argument("--preset", default="base", choices=["base", "smoke"])
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
    return add_common(ap)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (``--help`` lists the flags)."""
    return config_from_args(build_parser().parse_args(argv))


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out=a.out, device=a.device, minutes=a.minutes if a.minutes is not None else (0.5 if a.smoke else 8.0),
        steps=a.steps, vae_steps=a.vae_steps, vae_minutes=a.vae_minutes, batch=a.batch, vae_batch=a.vae_batch,
        lr=a.lr, seed=a.seed, preset=a.preset, log_every=a.log_every, ckpt_minutes=a.ckpt_minutes, eval_n=a.eval_n,
        guidances=tuple(a.guidances), pack_to=a.pack_to, compile=a.compile, amp=a.amp, resume=a.resume, workers=a.workers,
        smoke=a.smoke, arch=a.arch,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tokprune.yardstick.train`` through the shared CLI runner: 0 ok, 1 failure, 2 bad input,
    130 interrupted (a first Ctrl-C stops after the step and saves; re-run the command to resume)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batches are tokenized in forked workers
    words = list(argv if argv is not None else sys.argv[1:])

    def body(a: argparse.Namespace) -> int:
        report = run(config_from_args(a), words)
        print(json.dumps({"model_dir": report["model_dir"], "chosen": report["chosen"],
                          "transformer_steps": report["transformer"]["steps"], "total_seconds": report["total_seconds"]}))
        return 0

    return run_cli(build_parser(), words, body, interrupted_hint="re-run the same command to resume from the checkpoint")


if __name__ == "__main__":
    raise SystemExit(main())
