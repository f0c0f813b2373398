"""Measure, per denoising step, how much error keeping only K tokens would introduce.

:func:`profile_pipeline` runs an unmodified ``StableDiffusion3Pipeline`` densely on sample
prompts with a recording hook installed as the transformer's forward. At every step ``i >= 1``
the hook, before updating its caches with step ``i``, probes:

- **image keep K** for each K of the grid: ``pruned_forward(..., inplace=False)`` with the K/V
  caches and previous prediction as the dense run left them after step ``i-1`` and indices
  from the chosen selection policy (one policy instance per K, so CAT's staleness evolves as
  in a run pruned at that K; every instance sees the dense predictions, the first one as its
  dense reference);
- **text keep K_txt** for each K_txt of the text grid, all image tokens kept, text tokens
  chosen by :func:`~tokprune.pruning.policies.select_text_tokens` from the attention mass
  measured at step ``i-1``;
- **reuse** (K = 0): the previous prediction itself.

Each probe's error is ``||pred_K - pred_dense|| / ||pred_dense||`` of the *guided* prediction
(``uncond + g * (cond - uncond)`` under classifier-free guidance) per prompt, averaged over
prompts. It also records the per-token score distributions the policies use: relative noise
``||n_i - n_0||`` and dynamics ``mean |n_i - n_{i-1}|``.

Errors are measured one step at a time after a dense history; the optimizer treats them as
additive over steps (weighted by the scheduler's step sizes) and over image and text.

Example::

    from tokprune.models import build_tiny_pipeline
    from tokprune.calibrate.profile import load_prompts, profile_pipeline
    prof = profile_pipeline(build_tiny_pipeline(), load_prompts()[:4], steps=8, guidance=5.0)
    prof.image_error[5]   # mean relative error per grid K at step 5
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tokprune.errors import ConfigError
from tokprune.pruning.forward import patchify, pruned_forward
from tokprune.pruning.geometry import REUSE_MODES, Geometry

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_FRACTIONS",
    "TEXT_FRACTIONS",
    "ErrorProfile",
    "align_up",
    "default_grid",
    "derive_align",
    "load_prompts",
    "profile_pipeline",
]

#: Default image keep grid, as fractions of N (reuse K=0 and dense K=N are always measured/known).
IMAGE_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
#: Default text keep grid, as fractions of T.
TEXT_FRACTIONS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
_QUANTILES = (0.1, 0.5, 0.9, 0.99)


# ---- alignment and grids -------------------------------------------------------------------
def derive_align(num_tokens: int) -> int:
    """Bucket alignment for N image tokens: the largest power of two <= 64 that divides N and
    leaves at least 16 levels (64 at real sizes, N >= 1024; 16 for the tiny N = 256)."""
    if num_tokens < 1:
        raise ConfigError(f"num_tokens = {num_tokens}; expected >= 1")
    a = 64
    while a > 1 and (num_tokens % a or num_tokens // a < 16):
        a //= 2
    return a


def align_up(k: int, align: int, cap: int) -> int:
    """``k`` rounded up to a multiple of ``align``, at most ``cap`` (which need not be aligned)."""
    return min(cap, -(-int(k) // align) * align)


def default_grid(total: int, fractions: Sequence[float], align: int) -> tuple[int, ...]:
    """Distinct aligned keep counts ``0 < K < total`` for the given fractions, ascending."""
    ks = {align_up(max(1, math.ceil(f * total - 1e-9)), align, total) for f in fractions if 0.0 < f < 1.0}
    return tuple(sorted(k for k in ks if 0 < k < total))


# ---- prompts -------------------------------------------------------------------------------
def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one per line (blank lines and ``#`` comments skipped).

    ``path=None`` reads the calibration set shipped with the package (``prompts.txt``:
    objects, scenes, text rendering, counting, spatial relations, styles, short and long).
    """
    if path is None:
        text = importlib.resources.files("tokprune.calibrate").joinpath("prompts.txt").read_text(encoding="utf-8")
        source = "the built-in calibration prompts"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"prompt file {str(p)!r} does not exist; pass --prompts FILE with one prompt per line")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt file {str(p)!r} is not UTF-8 text ({e})") from None
        source = repr(str(p))
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError(f"{source} holds no prompts; expected one prompt per line")
    return prompts


def pick_prompts(prompts: Sequence[str], num: int | None) -> list[str]:
    """``num`` prompts spread evenly over the list (all when None or >= len), deterministic."""
    if num is None or num >= len(prompts):
        return list(prompts)
    if num < 1:
        raise ConfigError(f"--num-prompts {num}; expected >= 1")
    return [prompts[(i * len(prompts)) // num] for i in range(num)]


# ---- the profile ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorProfile:
    """Per-step measured errors: what keeping K image / K_txt text tokens at a step would cost.

    ``image_error[s][j]``: mean relative error at step ``s`` keeping ``image_grid[j]`` image
    tokens (all text). ``text_error[s][m]``: keeping ``text_grid[m]`` text tokens (all image).
    ``reuse_error[s]``: reusing step ``s-1``'s prediction. Step 0 has no history: ``inf``.
    ``step_weight[s]``: how much an error at step ``s`` matters (the scheduler's step size,
    normalised to mean 1); all ones when unknown.
    """

    num_tokens: int
    text_tokens: int
    image_grid: tuple[int, ...]
    image_error: tuple[tuple[float, ...], ...]
    reuse_error: tuple[float, ...]
    text_grid: tuple[int, ...] = ()
    text_error: tuple[tuple[float, ...], ...] = ()
    step_weight: tuple[float, ...] = ()
    num_samples: int = 0
    scores: dict = field(default_factory=dict)  # per-step score quantiles (JSON-native)

    def __post_init__(self) -> None:
        s = len(self.reuse_error)
        if s < 1 or len(self.image_error) != s:
            raise ConfigError(f"profile: {len(self.image_error)} image-error rows for {s} steps")
        if any(len(r) != len(self.image_grid) for r in self.image_error):
            raise ConfigError("profile: every image_error row needs one entry per image_grid value")
        if self.text_grid and (
            len(self.text_error) != s or any(len(r) != len(self.text_grid) for r in self.text_error)
        ):
            raise ConfigError("profile: text_error must be (steps, len(text_grid))")
        if list(self.image_grid) != sorted(set(self.image_grid)) or any(
            not 0 < k < self.num_tokens for k in self.image_grid
        ):
            raise ConfigError(f"profile: image_grid {self.image_grid} must be ascending, unique, within (0, N)")
        if list(self.text_grid) != sorted(set(self.text_grid)) or any(
            not 0 < k < self.text_tokens for k in self.text_grid
        ):
            raise ConfigError(f"profile: text_grid {self.text_grid} must be ascending, unique, within (0, T)")
        if not self.step_weight:
            object.__setattr__(self, "step_weight", (1.0,) * s)
        elif len(self.step_weight) != s:
            raise ConfigError(f"profile: {len(self.step_weight)} step weights for {s} steps")

    @property
    def steps(self) -> int:
        return len(self.reuse_error)

    def image_err(self, step: int, keep: int) -> float:
        """Error of keeping ``keep`` image tokens (0 = reuse, N = dense = 0), linear between grid points."""
        if keep <= 0:
            return self.reuse_error[step]
        if keep >= self.num_tokens:
            return 0.0
        xs = [0, *self.image_grid, self.num_tokens]
        ys = [self.reuse_error[step], *self.image_error[step], 0.0]
        return _interp(keep, xs, ys)

    def text_err(self, step: int, keep_text: int) -> float:
        """Error of keeping ``keep_text`` text tokens (T = 0); below the grid, the smallest probe's error."""
        if keep_text >= self.text_tokens:
            return 0.0
        if not self.text_grid:
            return math.inf
        xs = [*self.text_grid, self.text_tokens]
        ys = [*self.text_error[step], 0.0]
        return _interp(max(keep_text, self.text_grid[0]), xs, ys)

    def to_stats(self) -> dict[str, Any]:
        """JSON-native summary (``inf`` -> None) for the schedule file."""
        return {
            "num_samples": self.num_samples,
            "image_grid": list(self.image_grid),
            "image_error": [[_finite(v) for v in row] for row in self.image_error],
            "text_grid": list(self.text_grid),
            "text_error": [[_finite(v) for v in row] for row in self.text_error],
            "reuse_error": [_finite(v) for v in self.reuse_error],
            "step_weight": list(self.step_weight),
            "scores": self.scores,
        }


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if x == x1:
                return float(y1)
            if math.isinf(y0):
                return math.inf
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(ys[-1])


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


# ---- the recording hook ----------------------------------------------------------------------
class _Recorder:
    """Installed as ``transformer.forward`` during profiling: dense step + probes, one call per step."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        policy: str,
        seed: int,
        reuse: str,
        guidance: float,
        cfg: bool,
        image_grid: Sequence[int],
        text_grid: Sequence[int],
        steps: int,
        bar: Any,
    ) -> None:
        from tokprune.pruning.policies import make_policy

        self.transformer = transformer
        self.reuse = reuse
        self.guidance, self.cfg = guidance, cfg
        self.image_grid, self.text_grid = tuple(image_grid), tuple(text_grid)
        self.steps = steps
        self.bar = bar
        self.policies = {k: make_policy(policy, seed=seed) for k in self.image_grid}
        # sums over samples, per step: image (S, G), text (S, Gt), reuse (S,)
        self.image_sum = torch.zeros(steps, len(self.image_grid), dtype=torch.float64)
        self.text_sum = torch.zeros(steps, len(self.text_grid), dtype=torch.float64)
        self.reuse_sum = torch.zeros(steps, dtype=torch.float64)
        self.samples = 0
        self.rel_scores: list[list[torch.Tensor]] = [[] for _ in range(steps)]
        self.dyn_scores: list[list[torch.Tensor]] = [[] for _ in range(steps)]
        self.begin_run()

    def begin_run(self) -> None:
        self.step = 0
        self.caches: dict[str, torch.Tensor] | None = None
        self.prev: torch.Tensor | None = None  # (B, C, H, W) dense prediction of step i-1
        self.first: torch.Tensor | None = None  # (B, N, P) dense prediction of step 0
        self.mass: torch.Tensor | None = None  # (B, T) text attention mass of step i-1

    def _guided(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (P, C*H*W) the prediction the scheduler will use, per prompt."""
        p = pred.float().flatten(1)
        if not self.cfg:
            return p
        uncond, cond = p.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def _rel_err(self, pred: torch.Tensor, ref_guided: torch.Tensor) -> torch.Tensor:
        """(P,) float64 relative L2 error per prompt."""
        diff = (self._guided(pred) - ref_guided).norm(dim=1)
        return (diff / ref_guided.norm(dim=1).clamp_min(1e-12)).double()

    @torch.no_grad()
    def __call__(
        self,
        hidden_states,
        encoder_hidden_states=None,
        pooled_projections=None,
        timestep=None,
        block_controlnet_hidden_states=None,
        joint_attention_kwargs=None,
        return_dict=True,
        skip_layers=None,
    ):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        from tokprune.pruning.policies import select_text_tokens

        if block_controlnet_hidden_states is not None or skip_layers is not None or joint_attention_kwargs:
            raise ConfigError("calibration does not support ControlNet, skip_layers or joint_attention_kwargs")
        model, step = self.transformer, self.step
        if step >= self.steps:
            raise ConfigError(f"profiling run made more than {self.steps} transformer calls; expected one per step")
        b = hidden_states.shape[0]
        g = Geometry.from_model(
            model, batch=b, latent_hw=tuple(hidden_states.shape[-2:]), text_tokens=encoder_hidden_states.shape[1]
        )
        n, dev = g.num_tokens, hidden_states.device
        common = dict(
            latent=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
        )
        all_idx = torch.arange(n, device=dev).expand(b, n)  # (B, N)
        dense = pruned_forward(
            model, g, img_idx=all_idx, reuse=self.reuse, inplace=False, record_text=bool(self.text_grid), **common
        )
        ref = self._guided(dense.noise)  # (P, C*H*W)
        tokens = patchify(dense.noise, g.patch).float()  # (B, N, P)
        if step == 0:
            self.caches = {
                name: torch.zeros(shape, device=dev, dtype=hidden_states.dtype)
                for name, shape in g.cache_specs(self.reuse).items()
            }
            for pol in self.policies.values():
                pol.reset(batch=b, grid=g.grid, device=dev)
            self.first = tokens
        else:
            self.reuse_sum[step] += self._rel_err(self.prev, ref).sum()
            for j, k in enumerate(self.image_grid):
                idx = self.policies[k].select(k)  # (B, K)
                out = pruned_forward(
                    model,
                    g,
                    img_idx=idx,
                    caches=self.caches,
                    prev_noise=self.prev,
                    reuse=self.reuse,
                    inplace=False,
                    **common,
                )
                self.image_sum[step, j] += self._rel_err(out.noise, ref).sum()
            for m, kt in enumerate(self.text_grid):
                txt_idx = select_text_tokens(self.mass, kt)  # (B, K_txt)
                out = pruned_forward(
                    model, g, img_idx=all_idx, txt_idx=txt_idx, reuse=self.reuse, inplace=False, **common
                )
                self.text_sum[step, m] += self._rel_err(out.noise, ref).sum()
            prev_tokens = patchify(self.prev, g.patch).float()
            self.dyn_scores[step].append((tokens - prev_tokens).abs().mean(dim=-1).flatten().cpu())
        self.rel_scores[step].append((tokens - self.first).norm(dim=-1).flatten().cpu())
        # Caches now hold step i: every row was computed fresh, in token order (idx = arange).
        for name, rows in dense.fresh.items():
            self.caches[name].copy_(rows)
        for pol in self.policies.values():
            pol.observe(tokens.to(hidden_states.dtype), dense=step == 0)
        self.prev = dense.noise
        self.mass = dense.text_mass
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
        out = dense.noise
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def scores_summary(self) -> dict[str, Any]:
        def q(chunks: list[torch.Tensor]) -> dict[str, float] | None:
            if not chunks:
                return None
            x = torch.cat(chunks).double()
            qs = torch.quantile(x, torch.tensor(_QUANTILES, dtype=torch.float64)).tolist()
            return {"mean": float(x.mean()), **{f"p{round(p * 100)}": float(v) for p, v in zip(_QUANTILES, qs)}}

        return {
            "relative_noise": [q(c) for c in self.rel_scores],  # ||n_i - n_0|| per token
            "dynamics": [q(c) for c in self.dyn_scores],  # mean_c |n_i - n_{i-1}| per token
        }


# ---- the profiling run -----------------------------------------------------------------------
def profile_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance: float = 7.0,
    height: int | None = None,
    width: int | None = None,
    policy: str = "cat",
    seed: int = 0,
    batch_size: int = 4,
    max_sequence_length: int = 256,
    reuse: str = "noise",
    image_grid: Sequence[int] | None = None,
    text_grid: Sequence[int] | None = None,
    prune_text: bool = True,
    progress: bool = True,
) -> ErrorProfile:
    """Run ``pipe`` densely on ``prompts`` and measure per-step keep errors (module docstring).

    Args that matter:
        steps, guidance, height, width: as the pipeline will later be called (the pipeline's
            own scheduler is used as configured).
        policy: selection policy whose indices the probes use (``"cat"``, ``"dynamics"``, ``"random"``).
    Args to tinker with:
        batch_size: prompts per pipeline call (each call carries 2x that under CFG).
        image_grid / text_grid: keep counts to probe (default: :data:`IMAGE_FRACTIONS` of N and
            :data:`TEXT_FRACTIONS` of T, aligned with :func:`derive_align`).
        prune_text: probe text keeps at all.

    Cost: per step, one dense call plus one call per grid entry (~14 with the defaults).
    The pipeline's transformer is restored when this returns or raises.
    """
    from tqdm.auto import tqdm

    if reuse not in REUSE_MODES:
        raise ConfigError(f"reuse={reuse!r}; expected one of {REUSE_MODES}")
    if not prompts:
        raise ConfigError("no prompts to calibrate on")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}; expected >= 1")
    transformer = pipe.transformer
    if "forward" in transformer.__dict__:
        raise ConfigError(
            "the pipeline's transformer already has a hook installed (tokprune.pruning.apply?); "
            "call tokprune.pruning.remove(pipe) before calibrating"
        )
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    vsf = pipe.vae_scale_factor
    text_tokens = pipe.tokenizer.model_max_length + max_sequence_length
    g = Geometry.from_config(
        transformer.config, batch=1, latent_hw=(height // vsf, width // vsf), text_tokens=text_tokens
    )
    align = derive_align(g.num_tokens)
    img_grid = (
        tuple(sorted(set(image_grid))) if image_grid is not None else default_grid(g.num_tokens, IMAGE_FRACTIONS, align)
    )
    if not prune_text:
        txt_grid: tuple[int, ...] = ()
    else:
        txt_grid = (
            tuple(sorted(set(text_grid))) if text_grid is not None else default_grid(text_tokens, TEXT_FRACTIONS, align)
        )
    cfg = guidance > 1.0
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=len(batches) * steps, desc="calibrating", unit="step", disable=not progress)
    rec = _Recorder(
        transformer,
        policy=policy,
        seed=seed,
        reuse=reuse,
        guidance=guidance,
        cfg=cfg,
        image_grid=img_grid,
        text_grid=txt_grid,
        steps=steps,
        bar=bar,
    )
    sigmas = None
    progress_cfg = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    transformer.__dict__["forward"] = rec
    try:
        for bi, batch in enumerate(batches):
            rec.begin_run()
            gen = torch.Generator(device="cpu").manual_seed(seed + bi)
            pipe(
                prompt=batch,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gen,
                output_type="latent",
                max_sequence_length=max_sequence_length,
            )
            if rec.step != steps:
                raise ConfigError(
                    f"the pipeline made {rec.step} transformer calls for {steps} steps; expected one per step"
                )
            rec.samples += len(batch)
            sigmas = getattr(pipe.scheduler, "sigmas", None)
    finally:
        transformer.__dict__.pop("forward", None)
        pipe.set_progress_bar_config(**progress_cfg)
        bar.close()

    count = float(rec.samples)
    image_error = (rec.image_sum / count).tolist()
    text_error = (rec.text_sum / count).tolist()
    reuse_error = (rec.reuse_sum / count).tolist()
    reuse_error[0] = math.inf
    image_error[0] = [math.inf] * len(img_grid)
    if txt_grid:
        text_error[0] = [math.inf] * len(txt_grid)
    return ErrorProfile(
        num_tokens=g.num_tokens,
        text_tokens=text_tokens,
        image_grid=img_grid,
        image_error=tuple(tuple(r) for r in image_error),
        reuse_error=tuple(reuse_error),
        text_grid=txt_grid,
        text_error=tuple(tuple(r) for r in text_error) if txt_grid else (),
        step_weight=_step_weights(sigmas, steps),
        num_samples=rec.samples,
        scores=rec.scores_summary(),
    )


def _step_weights(sigmas: Any, steps: int) -> tuple[float, ...]:
    """|sigma_i - sigma_{i+1}| normalised to mean 1: an error in the velocity at step i moves the
    latent by that step size. Ones when the scheduler has no sigmas."""
    if sigmas is None or len(sigmas) < steps + 1:
        return (1.0,) * steps
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()[: steps + 1]
    dt = (s[:-1] - s[1:]).abs()
    if not torch.isfinite(dt).all() or float(dt.sum()) <= 0:
        return (1.0,) * steps
    return tuple(float(v) for v in dt / dt.mean())
