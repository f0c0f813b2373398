"""The settings of a yardstick training run (:class:`TrainConfig`) and the progress a checkpoint carries
(:class:`RunState`). Used by :mod:`tokprune.yardstick.train` (the command) and its phases.

Example::

    from tokprune.yardstick.train_config import TrainConfig
    tc = TrainConfig(out="runs/smoke", device="cpu", smoke=True).resolved()
    tc.batch, tc.steps      # (4, 4): a smoke run's tiny defaults
"""

from __future__ import annotations

import dataclasses
import os

from tokprune.errors import ConfigError
from tokprune.yardstick.model import PRESETS

__all__ = ["CKPT_VERSION", "RunState", "TrainConfig"]

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
    arch: str = "sd3"  # sd3 (the shapes model) or pixart (PixArt-architecture transformer on the shapes VAE)

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
            # pixart: 4 evaluations of its DPM-Solver sampling + saving, with room for a GPU shared with another job
            reserve_s=pick(self.reserve_s, 60.0 if self.arch == "pixart" else 45.0, 120.0, 20.0),
            amp=cuda if self.amp is None else self.amp,
            compile=cuda and not smoke if self.compile is None else self.compile,
            workers=pick(self.workers, min(6, max(1, (os.cpu_count() or 2) - 2)), 0, 0),
            warmup=2 if smoke else self.warmup,
        )
        from tokprune.yardstick.pixart_model import PIXART_PRESETS

        presets = {"sd3": PRESETS, "pixart": PIXART_PRESETS}.get(tc.arch)
        if presets is None:
            raise ConfigError(f"--arch {tc.arch!r}; expected sd3 or pixart")
        if tc.preset not in presets:
            raise ConfigError(f"--preset {tc.preset!r}; expected one of {tuple(presets)} for --arch {tc.arch}")
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
