"""Eager pruned sampling: ``apply`` / ``remove`` on a diffusers denoiser or pipeline of any model family.

After ``apply``, a plain pipeline call (``StableDiffusion3Pipeline`` and the other families of
:mod:`tokprune.pruning.family`) runs pruned; nothing in the user's loop changes. The hook keeps the per-run state (caches, previous prediction, policy state)
and walks the plan one transformer call per denoising step.

Example::

    import torch
    from tokprune.models import build_tiny_pipeline
    from tokprune import pruning

    pipe = build_tiny_pipeline()
    plan = pruning.PrunePlan.from_ratios([1, 1, 0.5, 0.5], num_tokens=256)
    pruning.apply(pipe, plan, policy="cat")
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    pruning.remove(pipe)   # the transformer is bit-for-bit the original again
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokprune.errors import ConfigError, ShapeError
from tokprune.pruning.family import ModelFamily, family_for, get_family
from tokprune.pruning.forward import StepOutput
from tokprune.pruning.geometry import REUSE_MODES
from tokprune.pruning.plan import PrunePlan

logger = logging.getLogger(__name__)

#: Name of the pruning hook in the denoiser's diffusers hook registry.
HOOK_NAME = "tokprune.pruning"
#: What a selection policy scores under classifier-free guidance (``TokenPruner.select_from``).
SELECT_FROM = ("guided", "cond")


@dataclass
class StepInputs:
    """Everything one bucket call needs besides the run state (caches, previous prediction)."""

    latent: torch.Tensor  # (B, C, H, W)
    conditions: dict[str, torch.Tensor]  # the family's conditioning inputs (SD3: encoder_hidden_states, pooled_projections)
    timestep: torch.Tensor  # (B,)
    img_idx: torch.Tensor  # (B, K) int64
    txt_idx: torch.Tensor | None  # (B, K_txt) int64 or None (all text)
    record_text: bool  # also measure the attention mass text tokens receive
    cached: bool = False  # a step-caching step (PrunePlan.step_cache; families with deep-feature caches)


def eager_executor(pruner: "TokenPruner", st: "RunState", inputs: StepInputs) -> StepOutput:
    """Run the step with the PyTorch pruned forward, writing fresh rows into ``st.caches`` in place.

    An executor must return the step's :class:`StepOutput` and leave ``st.caches`` updated with the
    fresh rows; the runtime's engine executor has the same contract (one step loop, many backends).
    """
    return pruner.family.pruned_forward(
        pruner.transformer,
        st.geometry,
        latent=inputs.latent,
        conditions=inputs.conditions,
        timestep=inputs.timestep,
        img_idx=inputs.img_idx,
        txt_idx=inputs.txt_idx,
        caches=st.caches,
        prev_noise=st.prev_noise,
        reuse=pruner.reuse,
        inplace=True,
        record_text=inputs.record_text,
        **({"cached": True} if inputs.cached else {}),  # only families with step caching take it
    )


@dataclass
class RunState:
    """Everything one sampling run carries from step to step (all on the model's device).

    Under classifier-free guidance the batch is ``[uncond (P rows); cond (P rows)]`` and ``guidance``
    is set: the policy sees one guided signal per prompt and both halves share its indices.
    """

    geometry: Any  # the family's geometry (SD3: Geometry)
    caches: dict[str, torch.Tensor]
    step: int = 0
    prev_noise: torch.Tensor | None = None  # (B, C, H, W)
    text_importance: torch.Tensor | None = None  # (B, T) attention mass measured at the last probe step
    guidance: float | None = None  # CFG scale when the batch is [uncond; cond] halves, else None
    prepared: dict[str, torch.Tensor] | None = None  # per-run conditions (an export's prompt stage), set once

    @property
    def prompts(self) -> int:
        """P: rows the selection policy sees (B / 2 under CFG)."""
        return self.geometry.batch // 2 if self.guidance is not None else self.geometry.batch


class TokenPruner:
    """The per-denoiser hook that ``apply`` installs as the module's ``forward``.

    ``family``: the model family (name or :class:`~tokprune.pruning.family.ModelFamily`); default the one
    owning ``transformer``.
    """

    def __init__(
        self,
        transformer: torch.nn.Module | None,
        plan: PrunePlan,
        *,
        policy: Any = None,
        seed: int = 0,
        reuse: str = "noise",
        text_protect: torch.Tensor | None = None,
        scheduler: Any = None,
        executor: Callable[["TokenPruner", "RunState", StepInputs], StepOutput] = eager_executor,
        config: Any = None,
        pipeline: Any = None,
        guidance: float | None = None,
        select_from: str = "guided",
        family: ModelFamily | str | None = None,
    ) -> None:
        from tokprune.pruning.policies import make_policy

        if reuse not in REUSE_MODES:
            raise ConfigError(f"reuse={reuse!r}; expected one of {REUSE_MODES}")
        if select_from not in SELECT_FROM:
            raise ConfigError(f"select_from={select_from!r}; expected one of {SELECT_FROM}")
        if transformer is None and (config is None or family is None or executor is eager_executor):
            raise ConfigError("TokenPruner(None, ...) runs no module itself: pass config=, family= and an executor=")
        self.transformer = transformer  # None when the executor runs something else (the runtime's engines)
        self.family = family_for(transformer) if family is None else get_family(family)
        self.plan = plan
        policy = self.family.default_policy if policy is None else policy
        self.policy = make_policy(policy, seed=seed) if isinstance(policy, str) else policy
        self.reuse = reuse
        self.text_protect = text_protect  # static (T,) / (B, T) mask given by the user
        self.call_text_protect: torch.Tensor | None = None  # (B, T), set per pipeline call (pruning.text)
        self.scheduler = scheduler  # when given, its step_index (a Python int) keeps us in sync
        self.pipeline = pipeline  # when given, CFG and the guidance scale are read from its current call
        self.guidance = guidance  # bare transformer: CFG scale of [uncond; cond] batches (None = no CFG)
        self.select_from = select_from
        self.executor = executor  # how a bucket call runs: eager PyTorch here, an engine runner in tokprune.runtime
        self.config = config if config is not None else transformer.config  # the denoiser config shapes come from
        self.state: RunState | None = None
        self.calls = 0  # transformer calls actually executed (K > 0), for tests and benchmarks
        self.probe_steps = frozenset(plan.probe_steps())  # dense steps that also measure text importance

    # ---- run bookkeeping --------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current run (call after aborting a generation mid-way)."""
        self.state = None

    def _step_index(self) -> int | None:
        """The scheduler's step index; None (count calls) without a scheduler or for schedulers that keep
        none (DDIM, PNDM): there a call at the scheduler's first timestep starts a new run."""
        if self.scheduler is None or not hasattr(self.scheduler, "step_index"):
            return None
        idx = self.scheduler.step_index
        return 0 if idx is None else int(idx)

    def _restarted(self, timestep: torch.Tensor | None) -> bool:
        """Counting calls: whether this call is at the scheduler's first timestep after the run began."""
        ts = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        if ts is None or timestep is None or self.state is None or self.state.step == 0 or len(ts) == 0:
            return False
        return bool(timestep.reshape(-1)[0].to(ts.device, ts.dtype) == ts[0])  # one host read per call (eager)

    def _check_scheduler_steps(self) -> None:
        """At the start of a run: the scheduler's step count must be the plan's (a shorter call would
        silently run the first steps of a longer plan)."""
        n = scheduler_steps(self.scheduler)
        if n is not None and n != self.plan.num_steps:
            raise ConfigError(
                f"the pipeline runs {int(n)} denoising steps but the plan has {self.plan.num_steps}; call it with "
                f"num_inference_steps={self.plan.num_steps}, or apply a plan of {int(n)} steps"
            )

    def allocate_caches(self, geometry: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The per-block caches of one run (override to pool them, as the runtime does)."""
        return {
            name: torch.zeros(shape, device=device, dtype=dtype)
            for name, shape in geometry.cache_specs(self.reuse).items()
        }

    def cfg_guidance(self, batch: int) -> float | None:
        """The CFG scale when this call's batch is ``[uncond; cond]`` halves, else None.

        With a pipeline (``apply(pipe, ...)``) it is the pipeline's current call; a bare transformer
        uses the ``guidance`` given to :func:`apply`.
        """
        if self.pipeline is not None:
            if not bool(getattr(self.pipeline, "do_classifier_free_guidance", False)):
                return None
            g = float(getattr(self.pipeline, "guidance_scale", 1.0))
        elif self.guidance is None:
            return None
        else:
            g = float(self.guidance)
        if batch % 2:
            raise ShapeError(
                f"classifier-free guidance (scale {g:g}) needs an even batch [uncond; cond]; got {batch} rows"
            )
        return g

    def begin(self, geometry: Any, device: torch.device, dtype: torch.dtype) -> RunState:
        """Start a run: caches, and the policy reset for one selection per prompt."""
        st = RunState(
            geometry=geometry, caches=self.allocate_caches(geometry, device, dtype), guidance=self.cfg_guidance(geometry.batch)
        )
        self.policy.reset(batch=st.prompts, grid=geometry.grid, device=device)
        return st

    # ---- the hooked forward -----------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The denoiser's forward, with the denoiser's own signature (the family parses it)."""
        geometry, call = self.family.parse_call(self.config, args, kwargs)
        hidden_states = call.latent
        step = self._step_index()
        st = self.state
        if step is None:  # no step index: count calls, wrap at the end of the plan (or at a restart)
            if st is None or st.step >= self.plan.num_steps or self._restarted(call.timestep):
                st = None
            step = 0 if st is None else st.step
        elif step == 0:
            st = None
        if st is not None and st.geometry != geometry:
            raise ShapeError(
                f"call shapes changed mid-run (step {step}): got {geometry}, the run started with {st.geometry}; "
                "call reset() between generations of different sizes"
            )
        if step >= self.plan.num_steps:
            raise ConfigError(
                f"denoising step {step} is beyond the plan's {self.plan.num_steps} steps; "
                f"call the pipeline with num_inference_steps={self.plan.num_steps} or give a plan of matching length"
            )
        if st is None:
            self._check_scheduler_steps()
            st = self.state = self.begin(geometry, hidden_states.device, hidden_states.dtype)
        st.step = step

        out = self.step(st, hidden_states, call.conditions, call.timestep)
        st.step = step + 1
        return self.family.wrap_output(out, call.return_dict)

    def step(
        self,
        st: RunState,
        latent: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """One denoising step of the plan: select, run, update caches and policy. Returns (B, C, H, W)."""
        from tokprune.pruning.policies import select_text_tokens

        g, step = st.geometry, st.step
        n = g.num_tokens
        keep = self.plan.image_k(step, n)
        keep_text = self.plan.text_k(step, g.text_tokens)
        if keep == 0:  # reuse step: no transformer call
            return st.prev_noise.clone()
        if keep < n and st.prev_noise is None:
            raise ConfigError(f"plan step {step} prunes (K={keep}) but no dense step has run before it")
        if keep == n and self.plan.is_cached(step) and st.prev_noise is None:
            raise ConfigError(f"plan step {step} is a cached step but no full step has run before it")

        if keep == n:
            idx = torch.arange(n, device=latent.device).expand(g.batch, n)
        else:
            idx = self.policy.select(keep)  # (P, K): one index set per prompt
            if st.guidance is not None:
                idx = torch.cat([idx, idx], dim=0)  # (B, K): both CFG halves compute the same tokens
        txt_idx = None
        if keep_text < g.text_tokens:
            if st.text_importance is None:
                raise ConfigError(
                    f"plan step {step} prunes text but no dense full-text step ran before it to measure text importance"
                )
            txt_idx = select_text_tokens(st.text_importance, keep_text, protect=self._protect(g))
        out = self.executor(
            self,
            st,
            StepInputs(
                latent=latent,
                conditions=conditions,
                timestep=timestep,
                img_idx=idx,
                txt_idx=txt_idx,
                record_text=step in self.probe_steps,  # only the dense step before text pruning
                cached=self.plan.is_cached(step),
            ),
        )
        self.calls += 1
        if out.text_mass is not None:
            st.text_importance = out.text_mass
        st.prev_noise = out.noise
        self.policy.observe(
            self.selection_signal(st, out.noise),
            dense=self.plan.is_dense(step),  # a text-pruned step is not a fresh reference
            # families whose every output token is recomputed within the step (U-Nets) re-score all rows
            selected=None if keep == n or self.family.outputs_all_tokens else idx[: st.prompts],
        )
        return out.noise

    def selection_signal(self, st: RunState, noise: torch.Tensor) -> torch.Tensor:
        """(P, N, C) what the policy scores: per prompt the guided prediction ``u + g (c - u)``
        (``select_from="guided"``, default) or the conditional half (``"cond"``); the rows as they
        are without CFG."""
        tokens = self.family.tokens(noise, st.geometry)  # (B, N, C)
        if st.guidance is None:
            return tokens
        uncond, cond = tokens.float().chunk(2)  # (P, N, C) each
        if self.select_from == "cond":
            return cond
        return uncond + st.guidance * (cond - uncond)

    def _protect(self, g: Any) -> torch.Tensor | None:
        """(B, T) bool tokens text pruning must keep: this call's special tokens (set by
        :mod:`tokprune.pruning.text` from the pipeline's tokenizers), or the user's static mask."""
        call = self.call_text_protect
        if call is not None and tuple(call.shape) == (g.batch, g.text_tokens):
            p = call if self.text_protect is None else call | self._static_protect(g)
            return p
        if call is not None:
            logger.warning(
                "the special-token mask of this call has shape %s but the transformer got (%d, %d) text rows; "
                "special tokens are not protected for this call", tuple(call.shape), g.batch, g.text_tokens,
            )
        return self._static_protect(g)

    def _static_protect(self, g: Any) -> torch.Tensor | None:
        if self.text_protect is None:
            return None
        p = self.text_protect
        if p.dim() == 1:
            p = p.unsqueeze(0).expand(g.batch, -1)
        if p.shape != (g.batch, g.text_tokens):
            raise ShapeError(f"text_protect has shape {tuple(p.shape)}; expected ({g.batch}, {g.text_tokens}) or ({g.text_tokens},)")
        return p


def scheduler_steps(scheduler: Any) -> int | None:
    """The step count a diffusers scheduler was set up for (None when unknown or no scheduler)."""
    if scheduler is None:
        return None
    n = getattr(scheduler, "num_inference_steps", None)
    if n is None and getattr(scheduler, "timesteps", None) is not None:
        n = len(scheduler.timesteps)
    return None if n is None else int(n)


def _split(target: Any) -> tuple[torch.nn.Module, Any]:
    """(denoiser, scheduler or None) from a denoiser module or a diffusers pipeline of a known family."""
    family = family_for(target)
    denoiser = family.denoiser(target)
    return denoiser, (getattr(target, "scheduler", None) if denoiser is not target else None)


def apply(
    target: Any,
    plan: PrunePlan,
    *,
    policy: Any = None,
    seed: int = 0,
    reuse: str = "noise",
    text_protect: torch.Tensor | None = None,
    guidance: float | None = None,
    select_from: str = "guided",
) -> TokenPruner:
    """Make ``target`` (a transformer or a pipeline) run the pruned forward following ``plan``.

    Args that matter:
        plan: keep counts per step (:class:`PrunePlan`); its length must equal ``num_inference_steps``.
        policy: ``"cat"`` (recommended for transformers; needs a dense first step), ``"dynamics"`` (DaTo's;
            the U-Net family's default), ``"random"``, or a :class:`~tokprune.pruning.policies.SelectionPolicy`
            instance. None: the model family's default.
    Args to tinker with:
        reuse: ``"noise"`` (CAT: unselected rows reuse the previous prediction; K/V caches only) or
            ``"features"`` (rebuild every token from cached attention/FF outputs with current gates).
        select_from: under classifier-free guidance both halves of a prompt always share one index
            set; the policy scores the guided prediction (``"guided"``, recommended: it is what the
            sampler integrates) or the conditional half (``"cond"``).
        guidance: only for a bare transformer called with ``[uncond; cond]`` batches: the CFG scale
            (a pipeline's own call settings are read instead).
        text_protect: (T,) or (B, T) bool, extra text tokens that text pruning must keep. With a
            pipeline the special tokens of each call (BOS/EOS) are protected automatically.
        seed: policy seed (``random``; KMeans init for ``cat`` is deterministic).

    Passing the pipeline (recommended) keeps the hook in step with the scheduler; with a bare
    transformer, calls are counted and wrap at the end of the plan (``reset()`` after an abort).
    Applying twice replaces the first hook (idempotent). Returns the hook.
    """
    from tokprune.pruning.hooks import install_forward

    transformer, scheduler = _split(target)
    pipeline = target if transformer is not target else None
    remove(target)
    pruner = TokenPruner(
        transformer, plan, policy=policy, seed=seed, reuse=reuse, text_protect=text_protect, scheduler=scheduler,
        pipeline=pipeline, guidance=guidance, select_from=select_from,
    )
    install_forward(transformer, HOOK_NAME, pruner)  # diffusers' hook registry (pruning/hooks.py)
    if pipeline is not None:
        pruner.family.bind_pipeline(pipeline, pruner)  # special-token masks (and what else the family needs)
    return pruner


def remove(target: Any) -> None:
    """Undo :func:`apply`: the module (and pipeline) are bit-for-bit the original (no parameter was ever touched)."""
    from tokprune.pruning.hooks import uninstall_forward

    transformer, _ = _split(target)
    uninstall_forward(transformer, HOOK_NAME)
    if transformer is not target:
        family_for(target).unbind_pipeline(target)


def get_pruner(target: Any) -> TokenPruner | None:
    """The installed hook, or None."""
    from tokprune.pruning.hooks import installed

    transformer, _ = _split(target)
    return installed(transformer, HOOK_NAME)
