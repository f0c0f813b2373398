"""Eager pruned sampling for SD1.5 / SDXL pipelines: ``apply`` / ``remove`` on a ``UNet2DConditionModel``.

:class:`UNetPruner` is the generic :class:`~tokprune.pruning.sampler.TokenPruner` (plan walk, one
selection per prompt under CFG, scheduler sync, text-importance probe steps, special tokens kept)
with the U-Net's call signature, its pruned step (:func:`~tokprune.families.unet.forward.unet_forward`)
and DeepCache steps (``PrunePlan.step_cache``).

Example::

    import torch
    from tokprune.pruning import PrunePlan
    from tokprune.families.unet import apply, remove
    from tokprune.families.unet.models import build_pipeline

    pipe = build_pipeline("sd15-tiny")                       # N = 1024 tokens at the pruned level
    plan = PrunePlan((-1, -1, 512, 512), step_cache=(False, False, True, False))
    apply(pipe, plan)                                        # DaTo dynamics policy
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    remove(pipe)                                             # the U-Net is bit-for-bit the original again
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tokprune.errors import ConfigError, ShapeError
from tokprune.families.unet import text as unet_text
from tokprune.families.unet.forward import call_conditions, check_supported, noise_tokens, unet_forward
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.pruning.forward import StepOutput
from tokprune.pruning.plan import PrunePlan
from tokprune.pruning.sampler import RunState, TokenPruner

logger = logging.getLogger(__name__)

_ATTR = "_tokprune_pruner"


class UNetPruner(TokenPruner):
    """The hook ``apply`` installs as the U-Net's ``forward``."""

    def __init__(self, unet: torch.nn.Module, plan: PrunePlan, *, cache_depth: int = 1, policy: Any = "dynamics",
                 **kwargs: Any) -> None:  # fmt: skip
        check_supported(unet)
        from tokprune.families.unet import FAMILY

        super().__init__(unet, plan, policy=policy, config=unet.config, family=FAMILY, **kwargs)
        self.cache_depth = int(cache_depth)
        #: What runs one step (``unet_forward``'s signature): eager PyTorch, or an exported-bucket runner
        #: (:class:`tokprune.families.unet.export.OrtRunner`).
        self.runner = unet_forward

    @property
    def unet(self) -> torch.nn.Module:
        return self.transformer

    def geometry_of(self, call: dict[str, Any]) -> UNetGeometry:
        s, e = call["sample"], call["encoder_hidden_states"]
        return UNetGeometry.from_config(
            self.config, batch=s.shape[0], latent_hw=tuple(s.shape[-2:]), text_tokens=e.shape[1],
            cache_depth=self.cache_depth,
        )  # fmt: skip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        call = call_conditions(args, kwargs)
        geometry = self.geometry_of(call)
        step = self._step_index()
        st = self.state
        if step is None:  # no scheduler step index: count calls, wrap at the end of the plan
            if st is None or st.step >= self.plan.num_steps or self._restarted(call["timestep"]):
                st = None
            step = 0 if st is None else st.step
        elif step == 0:
            st = None
        if st is not None and st.geometry != geometry:
            raise ShapeError(
                f"call shapes changed mid-run (step {step}): got {geometry.to_dict()}, the run started with "
                f"{st.geometry.to_dict()}; call reset() between generations of different sizes"
            )
        if step >= self.plan.num_steps:
            raise ConfigError(
                f"denoising step {step} is beyond the plan's {self.plan.num_steps} steps; call the pipeline with "
                f"num_inference_steps={self.plan.num_steps} or give a plan of matching length"
            )
        if st is None:
            self._check_scheduler_steps()
            st = self.state = self.begin(geometry, call["sample"].device, call["sample"].dtype)
        st.step = step
        out = self.unet_step(st, call)
        st.step = step + 1
        return UNet2DConditionOutput(sample=out) if call["return_dict"] else (out,)

    def _step_index(self) -> int | None:
        """The scheduler's step index; None for schedulers without one (DDIM, PNDM, DPM-Solver keep none
        before diffusers' newer API): calls are counted instead, and a call at the scheduler's first
        timestep starts a new run (an aborted generation does not desynchronise the next)."""
        if self.scheduler is not None and not hasattr(self.scheduler, "step_index"):
            return None
        return super()._step_index()

    def _restarted(self, timestep: torch.Tensor) -> bool:
        ts = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        if ts is None or self.state is None or self.state.step == 0 or len(ts) == 0:
            return False
        return bool(timestep.reshape(-1)[0].to(ts.device, ts.dtype) == ts[0])  # one host read per call (eager)

    def unet_step(self, st: RunState, call: dict[str, Any]) -> torch.Tensor:
        """One denoising step of the plan: select, run (full / cached), observe. Returns (B, C, H, W)."""
        from tokprune.pruning.policies import select_text_tokens

        g, step = st.geometry, st.step
        n = g.num_tokens
        keep = self.plan.image_k(step, n)
        keep_text = self.plan.text_k(step, g.text_tokens)
        if keep == 0:
            return st.prev_noise.clone()
        idx = None
        if keep < n:
            if st.prev_noise is None:
                raise ConfigError(f"plan step {step} prunes (K={keep}) but no step has run before it (dynamics needs one)")
            idx = self.policy.select(keep)  # (P, K)
            if st.guidance is not None:
                idx = torch.cat([idx, idx], dim=0)  # both CFG halves keep the same tokens
        txt_idx = None
        if keep_text < g.text_tokens:
            if st.text_importance is None:
                raise ConfigError(f"plan step {step} prunes text but no dense probe step measured text importance before it")
            txt_idx = select_text_tokens(st.text_importance, keep_text, protect=self._protect(g))
        out: StepOutput = self.runner(
            self.unet, g, sample=call["sample"], timestep=call["timestep"],
            encoder_hidden_states=call["encoder_hidden_states"], text_embeds=call["text_embeds"],
            time_ids=call["time_ids"], img_idx=idx, txt_idx=txt_idx, caches=st.caches,
            step_kind="cached" if self.plan.is_cached(step) else "full", inplace=True,
            record_text=step in self.probe_steps,
        )  # fmt: skip
        self.calls += 1
        if out.text_mass is not None:
            st.text_importance = out.text_mass
        st.prev_noise = out.noise
        # Every output token is recomputed at a U-Net step (pruning is within the step), so all rows re-score.
        self.policy.observe(self.selection_signal(st, out.noise), dense=self.plan.is_dense(step), selected=None)
        return out.noise

    def selection_signal(self, st: RunState, noise: torch.Tensor) -> torch.Tensor:
        tokens = noise_tokens(noise, st.geometry)  # (B, N, C) pooled to the pruned level
        if st.guidance is None:
            return tokens
        uncond, cond = tokens.float().chunk(2)
        return cond if self.select_from == "cond" else uncond + st.guidance * (cond - uncond)


def _split(target: Any) -> tuple[torch.nn.Module, Any]:
    if hasattr(target, "unet") and hasattr(target, "scheduler"):
        return target.unet, target.scheduler
    if hasattr(target, "down_blocks") and hasattr(target, "conv_in"):
        return target, None
    raise ConfigError(f"apply/remove take a UNet2DConditionModel or an SD1.5/SDXL pipeline, got {type(target).__name__}")


def apply(target: Any, plan: PrunePlan, *, policy: Any = "dynamics", cache_depth: int = 1, seed: int = 0,
          guidance: float | None = None, select_from: str = "guided",
          text_protect: torch.Tensor | None = None) -> UNetPruner:  # fmt: skip
    """Make ``target`` (a U-Net or an SD1.5 / SDXL pipeline) run pruned following ``plan``.

    ``plan.image_keep`` counts tokens of the pruned level (``UNetGeometry.num_tokens``; K >= a quarter
    of them: one base token per 2x2 window), ``plan.text_keep`` text rows, ``plan.step_cache`` marks
    DeepCache steps; ``cache_depth`` outer blocks run on those. Returns the hook; :func:`remove` undoes it.
    """
    unet, scheduler = _split(target)
    pipeline = target if unet is not target else None
    remove(target)
    pruner = UNetPruner(unet, plan, cache_depth=cache_depth, policy=policy, seed=seed, scheduler=scheduler,
                        pipeline=pipeline, guidance=guidance, select_from=select_from, text_protect=text_protect)  # fmt: skip
    unet.__dict__["forward"] = pruner
    unet.__dict__[_ATTR] = pruner
    if pipeline is not None:
        unet_text.install(pipeline, lambda mask: setattr(pruner, "call_text_protect", mask))
    return pruner


def remove(target: Any) -> None:
    """Undo :func:`apply` (no parameter was ever touched)."""
    unet, _ = _split(target)
    unet.__dict__.pop("forward", None)
    unet.__dict__.pop(_ATTR, None)
    if unet is not target:
        unet_text.uninstall(target)


def get_pruner(target: Any) -> UNetPruner | None:
    unet, _ = _split(target)
    return unet.__dict__.get(_ATTR)
