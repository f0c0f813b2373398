"""Sampling runs of the comparison: dense and planned latents, diffusers-cache runs, decoding, counted MACs.

Every run of one chunk of captions uses the same prompts, per-caption seeds (caption ``i`` of the
held-out split uses a CPU generator seeded ``seed + i``, whatever chunk it falls in) and call
settings. Plans run through :class:`tokprune.calibrate.rollout.Rollouts` when it is available
(shared dense prefixes are computed once per chunk); :class:`EagerRuns` is the plain fallback
with the same interface (one full pipeline call per plan, ``tokprune.pruning.apply``).
Final latents are decoded exactly as ``StableDiffusion3Pipeline`` does (:func:`decode`).

Example::

    call = Call(steps=28, guidance=7.0, height=128, width=128, max_sequence_length=32)
    runs = make_runs(pipe, ["a red circle"], call=call, seeds=[0])
    images = decode(pipe, runs.run(plan, "cat"))      # (1, 128, 128, 3) float32 in [0, 1]
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tokprune.errors import ConfigError
from tokprune.pruning.family import family_for

logger = logging.getLogger(__name__)

SNAPSHOT_BYTES = 1 << 30  # prefix snapshots kept per Rollouts object (one chunk's rows share its dense warm-ups)
SNAPSHOT_BYTES_GPU = 4 << 30  # the same on a GPU: fixed, not a share of free memory (a job beside it may grow)

__all__ = ["Call", "EagerRuns", "decode", "geometry_of", "make_runs", "measure_plan_macs", "run_cache"]


@dataclass(frozen=True)
class Call:
    """How every pipeline call of the comparison samples (dense and pruned alike)."""

    steps: int
    guidance: float
    height: int
    width: int
    max_sequence_length: int

    def kwargs(self) -> dict[str, Any]:
        from tokprune.yardstick.model import call_kwargs

        return call_kwargs(**asdict(self))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def geometry_of(pipe: Any, call: Call, prompts: int) -> Any:
    """The MAC geometry of one call on ``prompts`` captions (both CFG halves when guidance > 1)."""
    return settings_of(pipe, call, prompts).geometry(family_for(pipe).denoiser(pipe))


def settings_of(pipe: Any, call: Call, prompts: int) -> Any:
    """The :class:`~tokprune.pruning.family.CallSettings` of one call on ``prompts`` captions."""
    return family_for(pipe).settings(
        pipe, height=call.height, width=call.width, steps=call.steps, guidance=call.guidance,
        max_sequence_length=call.max_sequence_length, prompts=prompts,
    )


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _latents(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], call: Call) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=list(prompts), generator=_generators(seeds), output_type="latent", **call.kwargs())
    return out.images.detach().clone()


def decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """(P, H, W, 3) float32 images in [0, 1] from final latents (any device), as the SD3 pipeline decodes them."""
    vae = pipe.vae
    with torch.no_grad():
        x = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(image, output_type="np"), dtype=np.float32)


class EagerRuns:
    """Dense and planned final latents of fixed prompts and seeds, one full pipeline call each.

    Same interface as ``tokprune.calibrate.rollout.Rollouts``: :meth:`dense`, :meth:`run`, :meth:`error`.
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], *, call: Call, seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds) or not prompts:
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt (>= 1)")
        self.pipe, self.prompts, self.call, self.seeds = pipe, list(prompts), call, list(seeds)
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = _latents(self.pipe, self.prompts, self.seeds, self.call)
        return self._dense

    def run(self, plan: Any, policy: str = "cat") -> torch.Tensor:
        from tokprune import pruning

        pruning.apply(self.pipe, plan, policy=policy)  # special tokens: protected per call by apply
        try:
            return _latents(self.pipe, self.prompts, self.seeds, self.call)
        finally:
            pruning.remove(self.pipe)

    def error(self, plan: Any, policy: str = "cat") -> float:
        """Relative L2 error of all final latents vs dense."""
        lat, dense = self.run(plan, policy).double(), self.dense().double()
        return float((lat - dense).norm() / dense.norm())


def make_runs(pipe: Any, prompts: Sequence[str], *, call: Call, seeds: Sequence[int], prefer_rollouts: bool = True) -> Any:
    """``Rollouts`` (shared prefixes) when available and its seeding matches ``seeds``, else :class:`EagerRuns`."""
    if prefer_rollouts:
        try:
            from tokprune.calibrate.rollout import Rollouts  # type: ignore[import-not-found]
        except ImportError:
            Rollouts = None  # noqa: N806
        if Rollouts is not None:
            params = inspect.signature(Rollouts).parameters
            kw = dict(
                steps=call.steps,
                guidance=call.guidance,
                height=call.height,
                width=call.width,
                max_sequence_length=call.max_sequence_length,
            )
            if "snapshot_bytes" in params:
                on_gpu = getattr(getattr(pipe, "_execution_device", None), "type", "cpu") == "cuda"
                kw["snapshot_bytes"] = SNAPSHOT_BYTES_GPU if on_gpu else SNAPSHOT_BYTES
            if "seeds" in params:
                return Rollouts(pipe, list(prompts), seeds=list(seeds), **kw)
            ro = Rollouts(pipe, list(prompts), seed=int(seeds[0]), **kw)
            start = getattr(ro, "start", None)
            if isinstance(start, torch.Tensor) and start.shape[0] == len(prompts):
                # Rollouts draws every start latent from ONE generator, so a caption's start would depend on
                # its place in the chunk; draw each from its own caption's seed, as a pipeline call with a
                # list of generators does (before any run: nothing derived from the old start exists yet).
                ro.start = torch.cat([
                    pipe.prepare_latents(1, start.shape[1], call.height, call.width, start.dtype, start.device, g, None)
                    for g in _generators(seeds)
                ])
                return ro
            logger.warning("Rollouts has no per-prompt seeds (no .start to set); using plain pipeline runs")
    return EagerRuns(pipe, prompts, call=call, seeds=seeds)


def run_cache(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], call: Call, spec: Any
) -> tuple[torch.Tensor, list[float], list[int], float]:
    """A diffusers cache on each caption alone (its skip decisions then depend on that caption only).

    Returns (latents (P, C, h, w), counted MAC fraction per caption, transformer calls per caption, seconds).
    """
    from tokprune.pruning.macs import dense_macs
    from tokprune.families.sd3.caches import cached
    from tokprune.yardstick.counting import MacCounter

    unit = call.steps * dense_macs(geometry_of(pipe, call, 1))
    lats, fracs, calls = [], [], []
    t0 = time.perf_counter()
    for prompt, seed in zip(prompts, seeds):
        with cached(pipe, spec, steps=call.steps), MacCounter(pipe.transformer) as mc:
            lats.append(_latents(pipe, [prompt], [seed], call))
        fracs.append(mc.total / unit)
        calls.append(mc.calls)
    return torch.cat(lats), fracs, calls, time.perf_counter() - t0


def measure_plan_macs(pipe: Any, plan: Any, policy: str, call: Call, prompt: str, seed: int) -> dict[str, Any]:
    """Counted MACs of one full eager run of ``plan`` on one caption: what actually runs, selection included.

    Returns ``{"fraction": counted / (steps * dense_macs), "analytic": mac_fraction(g, plan),
    "calls": transformer calls that computed (reuse steps make none), "per_call": [...]}``.
    """
    from tokprune import pruning
    from tokprune.pruning.macs import dense_macs, mac_fraction
    from tokprune.yardstick.counting import MacCounter

    g = geometry_of(pipe, call, 1)
    pruning.apply(pipe, plan, policy=policy)
    try:
        with MacCounter(pipe.transformer) as mc:
            _latents(pipe, [prompt], [seed], call)
    finally:
        pruning.remove(pipe)
    computed = [m for m in mc.per_call if m > 0]
    return {
        "fraction": mc.total / (call.steps * dense_macs(g)),
        "analytic": mac_fraction(g, plan),
        "calls": len(computed),
        "per_call": mc.per_call,
    }
