"""Analytic multiply-accumulate counts of one pruned PixArt call, per keep bucket.

Counts what :func:`tokprune.families.pixart.forward.pruned_forward` computes (matmuls, the patch
convolution and attention; norms, GELU, softmax and elementwise ops are not MACs, as in
``torch.utils.flop_counter``). Per sample, ``N`` image tokens, ``K`` kept, ``T'`` kept text
tokens, width ``D``:

- patch embedding on all N tokens ``N * D * C_in * p^2``; timestep MLP ``256 D + D^2`` and the
  shared ada-norm-single linear ``6 D^2`` (plus the resolution / aspect-ratio MLPs of PixArt-α);
- per block: self-attention Q/K/V/out on K rows ``4 K D^2`` and ``2 K N D`` attention; cross-
  attention query and output on K rows ``2 K D^2`` and ``2 K T' D`` attention; FF ``8 K D^2``;
- final projection ``rows * D * p^2 * C_out`` (rows = K, or N for ``reuse="features"`` at K < N).

The per-prompt text stage (:func:`prompt_macs`: caption projection ``T (C_cap D + D^2)`` and every
block's text K/V ``2 T D^2``) runs once per sampling run, not per step, so :func:`step_macs`
does not include it; :func:`diffusers_dense_macs` (one stock diffusers call, which recomputes it)
does. The text-importance probe adds one more ``Q K^T`` over the kept text per block.

Example::

    from tokprune.families.pixart.geometry import PixArtGeometry
    from tokprune.families.pixart.macs import step_macs
    from tokprune.families.pixart.models import PIXART_SIGMA_XL_CONFIG
    g = PixArtGeometry.from_config(PIXART_SIGMA_XL_CONFIG, batch=2, latent_hw=(128, 128), text_tokens=300)
    step_macs(g, 2048) / step_macs(g, 4096)     # 0.50: attention grows with K x N, so halving K halves it too
"""

from __future__ import annotations

from tokprune.families.pixart.geometry import PixArtGeometry
from tokprune.pruning.macs import resolve_count, resolve_keeps
from tokprune.pruning.plan import ALL, PrunePlan

__all__ = ["bucket_step_macs", "dense_macs", "diffusers_dense_macs", "mac_fraction", "plan_macs", "prompt_macs", "step_macs",
           "text_mass_macs"]

TIMESTEP_CHANNELS = 256  # sinusoid width of PixArt's timestep embedding


def _embed_macs(g: PixArtGeometry) -> int:
    d = g.dim
    macs = g.num_tokens * d * g.in_channels * g.patch * g.patch  # patch conv
    macs += TIMESTEP_CHANNELS * d + d * d + 6 * d * d  # timestep MLP + ada-norm-single linear
    if g.additional_conditions:  # resolution and aspect-ratio MLPs (size_emb_dim = D // 3); 2 + 1 values
        s = d // 3
        macs += 3 * (TIMESTEP_CHANNELS * s + s * s)
    return macs


def _call_macs(g: PixArtGeometry, keep: int, keep_text: int, reuse: str) -> int:
    n, d, k, tk = g.num_tokens, g.dim, keep, keep_text
    per_block = 4 * k * d * d + 2 * k * n * d  # self-attention
    per_block += 2 * k * d * d + 2 * k * tk * d  # cross-attention (text K/V precomputed)
    per_block += 8 * k * d * d  # FF 4x
    rows = n if (reuse == "features" and k < n) else k
    return _embed_macs(g) + g.num_layers * per_block + rows * d * g.patch * g.patch * g.out_channels


def prompt_macs(geometry: PixArtGeometry) -> int:
    """MACs of the per-prompt text stage (caption projection + every block's text K/V), batch included; once per run."""
    g = geometry
    d, t = g.dim, g.text_tokens
    caption = t * (g.caption_channels * d + d * d) if g.caption_projection else 0  # two linears
    kv = g.num_layers * 2 * t * g.cross_attention_dim * d
    return g.batch * (caption + kv)


def text_mass_macs(geometry: PixArtGeometry, keep: int | None = None, keep_text: int | None = None) -> int:
    """Extra MACs of the text-importance probe: one more ``Q K^T`` of the K queries over T' text keys per block."""
    k = resolve_count(keep, geometry.num_tokens, "keep")
    tk = resolve_count(keep_text, geometry.text_tokens, "keep_text")
    return geometry.batch * geometry.num_layers * k * tk * geometry.dim


def step_macs(
    geometry: PixArtGeometry, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False
) -> int:
    """MACs of one pruned call keeping ``keep`` image and ``keep_text`` text tokens (batch included).

    ``keep``: ALL or N = dense, 0 = reuse step (no call, 0 MACs). ``probe`` adds :func:`text_mass_macs`.
    The per-prompt text stage is not included (:func:`prompt_macs`).
    """
    k, tk = resolve_keeps(geometry, keep, keep_text, reuse, probe=probe)
    if k == 0:
        return 0
    macs = geometry.batch * _call_macs(geometry, k, tk, reuse)
    return macs + (text_mass_macs(geometry, k, tk) if probe else 0)


def bucket_step_macs(
    geometry: PixArtGeometry, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False
) -> int:
    """MACs of one call as an exported bucket runs it: :func:`step_macs`, plus the text stage when the bucket
    takes the prompt's embeddings (``geometry.text_kv_inputs`` False) and so recomputes it every call."""
    macs = step_macs(geometry, keep, keep_text, reuse, probe=probe)
    if macs and not geometry.text_kv_inputs:
        macs += prompt_macs(geometry)
    return macs


def dense_macs(geometry: PixArtGeometry) -> int:
    """One dense step as tokprune runs it (text stage precomputed): the budget's unit."""
    return step_macs(geometry, ALL)


def diffusers_dense_macs(geometry: PixArtGeometry) -> int:
    """One stock diffusers ``PixArtTransformer2DModel`` call (recomputes the text stage every step)."""
    return dense_macs(geometry) + prompt_macs(geometry)


def plan_macs(geometry: PixArtGeometry, plan: PrunePlan, reuse: str = "noise") -> int:
    """Total MACs of a run following ``plan`` (reuse steps 0, probe steps add the probe), the text stage once."""
    probes = set(plan.probe_steps())
    steps = sum(
        step_macs(geometry, plan.image_k(s, geometry.num_tokens), plan.text_k(s, geometry.text_tokens), reuse,
                  probe=s in probes)
        for s in range(plan.num_steps)
    )
    return steps + prompt_macs(geometry)


def mac_fraction(geometry: PixArtGeometry, plan: PrunePlan, reuse: str = "noise") -> float:
    """``plan_macs / (steps * dense_macs + prompt_macs)``: the fraction of a dense run's MACs the plan spends."""
    dense_run = plan.num_steps * dense_macs(geometry) + prompt_macs(geometry)
    return plan_macs(geometry, plan, reuse) / dense_run
