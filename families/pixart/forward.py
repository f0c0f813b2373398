"""The pruned PixArt forward: one functional step over K selected image tokens.

One implementation for the eager sampler (``inplace=True``), the ONNX export (``inplace=False``,
a pure function of its inputs) and calibration probes, mirroring diffusers'
``PixArtTransformer2DModel`` with ``BasicTransformerBlock(norm_type="ada_norm_single")`` blocks.

Per block ``i`` only the K selected rows ``x[idx]`` are computed:

- self-attention: ada-norm-single modulation, Q/K/V/out on the K rows; their fresh keys and values
  are written into the block's K/V cache of all N image tokens and the K queries attend over all N;
- cross-attention: the K rows query the prompt's text keys/values (padding masked by the
  additive bias diffusers builds from ``encoder_attention_mask``);
- feed-forward on the K rows.

The text keys and values of every block depend on the prompt only (caption projection, then
``attn2.to_k`` / ``to_v``), never on the step: :func:`text_conditions` computes them once per
prompt. ``pruned_forward`` takes them from ``conditions`` (exported buckets: inputs), from the
run's ``caches`` (eager: stored there by the first call of a run), or computes them from
``encoder_hidden_states`` when neither holds them.

Output rule ``reuse="noise"`` (CAT): the unselected rows of the noise prediction are the previous
step's; ``reuse="features"``: the un-gated self-attention, cross-attention and feed-forward outputs
of all N tokens are cached and every token's residual stream is rebuilt with the current gates.
The noise prediction keeps all ``out_channels`` (8 for PixArt-Σ: noise and learned sigma), the
same contract as diffusers; the pipeline splits them.

Exactness: ``K == N`` equals diffusers' dense forward; any K equals it when the caches hold what
this very input produces (``tests/families/pixart/test_forward.py``).

Example::

    import torch
    from tokprune.families.pixart.forward import pruned_forward
    from tokprune.families.pixart.geometry import PixArtGeometry
    from tokprune.families.pixart.models import build_tiny_transformer
    model = build_tiny_transformer()
    g = PixArtGeometry.from_model(model, batch=1, latent_hw=(32, 32), text_tokens=12)
    out = pruned_forward(model, g, latent=torch.randn(1, 4, 32, 32), timestep=torch.tensor([500]),
                         conditions={"encoder_hidden_states": torch.randn(1, 12, 32)},
                         img_idx=torch.arange(g.num_tokens)[None])
    out.noise.shape   # (1, 8, 32, 32)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tokprune.errors import ConfigError, ShapeError
from tokprune.families.pixart.geometry import PixArtGeometry
from tokprune.pruning.forward import StepOutput, all_rows, check_step, gather_rows, patchify, scatter_rows, unpatchify

__all__ = ["MASK_BIAS", "PromptStage", "mask_bias", "pruned_forward", "text_conditions", "text_mass"]

#: diffusers' additive bias for a masked (padding) text token.
MASK_BIAS = -10000.0


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)  # (B, H, S, hd)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, hd = x.shape
    return x.transpose(1, 2).reshape(b, s, h * hd)


def mask_bias(mask: torch.Tensor | None, *, batch: int, text_tokens: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """(B, T) additive cross-attention bias from diffusers' ``encoder_attention_mask`` forms.

    ``None``: no padding (zeros). ``(B, T)`` keep-mask (1/True keep, 0 pad): ``(1 - mask) * -10000``
    as diffusers computes it. ``(B, 1, T)``: already a bias.
    """
    if mask is None:
        return torch.zeros(batch, text_tokens, dtype=dtype, device=device)
    if mask.dim() == 3:
        if mask.shape[1] != 1:
            raise ShapeError(f"encoder_attention_mask bias has shape {tuple(mask.shape)}; expected (B, 1, T)")
        bias = mask[:, 0].to(dtype)
    elif mask.dim() == 2:
        bias = (1 - mask.to(dtype)) * MASK_BIAS
    else:
        raise ShapeError(f"encoder_attention_mask has shape {tuple(mask.shape)}; expected (B, T) or (B, 1, T)")
    if tuple(bias.shape) != (batch, text_tokens):
        raise ShapeError(f"encoder_attention_mask covers {tuple(bias.shape)}; expected (batch, T) = ({batch}, {text_tokens})")
    return bias


def text_conditions(
    model: torch.nn.Module,
    geometry: PixArtGeometry,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The per-prompt part of a call (:meth:`PixArtGeometry.text_specs`): mask bias and every block's text K/V.

    A pure function of the prompt's embeddings: a run computes it once (eager: at its first
    call; exported: one small graph per run) and every step reads it.
    """
    g = geometry
    b, t = encoder_hidden_states.shape[:2]
    if (b, t) != (g.batch, g.text_tokens):
        raise ShapeError(
            f"encoder_hidden_states has {b} rows of {t} tokens; the geometry expects ({g.batch}, {g.text_tokens})"
        )
    ctx = encoder_hidden_states
    if model.caption_projection is not None:
        ctx = model.caption_projection(ctx).view(b, t, -1)  # (B, T, D)
    out = {
        "text_bias": mask_bias(encoder_attention_mask, batch=b, text_tokens=t, dtype=ctx.dtype, device=ctx.device)
    }
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn2
        if getattr(attn, "norm_cross", None):
            raise ConfigError("PixArt cross-attention with norm_cross is not supported by tokprune's pruned forward")
        k = _heads(attn.to_k(ctx), attn.heads)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out[f"text.{i}.k"] = k
        out[f"text.{i}.v"] = _heads(attn.to_v(ctx), attn.heads)
    return out


def text_mass(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean cross-attention probability each text key receives. q (B,H,Sq,hd), k (B,H,T,hd), bias (B,T) -> (B, T).

    Padding keys carry the -10000 bias, so they receive (numerically) nothing. Queries go
    ``chunk`` at a time so memory stays O(B·H·chunk·T).
    """
    scale = q.shape[-1] ** -0.5
    kf = k.float().transpose(-1, -2)
    bf = bias.float()[:, None, None, :]
    total = q.new_zeros(q.shape[0], k.shape[2], dtype=torch.float32)
    for start in range(0, q.shape[2], chunk):
        probs = torch.softmax((q[:, :, start : start + chunk].float() @ kf) * scale + bf, dim=-1)  # (B, H, c, T)
        total = total + probs.sum(dim=2).mean(dim=1)
    return total / q.shape[2]


def _text_inputs(
    model: torch.nn.Module,
    g: PixArtGeometry,
    conditions: dict[str, Any],
    caches: dict[str, torch.Tensor] | None,
    inplace: bool,
) -> dict[str, torch.Tensor]:
    """Text K/V and bias from ``conditions`` (precomputed), the run's caches, or computed now (then cached when inplace)."""
    names = g.text_specs()
    if all(n in conditions for n in names):
        return {n: conditions[n] for n in names}
    if caches is not None and all(n in caches for n in names):
        return {n: caches[n] for n in names}
    ehs = conditions.get("encoder_hidden_states")
    if ehs is None:
        raise ConfigError(
            "PixArt pruned forward needs conditions['encoder_hidden_states'] (with optional 'encoder_attention_mask') "
            f"or the precomputed text conditions {sorted(names)[:3]}...; got keys {sorted(conditions)}"
        )
    text = text_conditions(model, g, ehs, conditions.get("encoder_attention_mask"))
    if caches is not None and inplace:  # the run's per-prompt entry: later steps of this run read it
        caches.update(text)
    return text


def _added_cond(model: torch.nn.Module, g: PixArtGeometry, conditions: dict[str, Any]) -> dict[str, Any]:
    if not g.additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    res, ar = conditions.get("resolution"), conditions.get("aspect_ratio")
    if res is None or ar is None:
        raise ConfigError(
            "this PixArt model uses additional conditions (use_additional_conditions): pass conditions['resolution'] "
            "(B, 2) and conditions['aspect_ratio'] (B, 1), as the PixArt-α pipeline's added_cond_kwargs"
        )
    return {"resolution": res, "aspect_ratio": ar}


def pruned_forward(
    model: torch.nn.Module,
    geometry: PixArtGeometry,
    *,
    latent: torch.Tensor,
    timestep: torch.Tensor,
    conditions: dict[str, Any],
    img_idx: torch.Tensor,
    txt_idx: torch.Tensor | None = None,
    caches: dict[str, torch.Tensor] | None = None,
    prev_noise: torch.Tensor | None = None,
    reuse: str = "noise",
    inplace: bool = False,
    record_text: bool = False,
) -> StepOutput:
    """Run one PixArt transformer call on the selected image (and text) tokens.

    Args:
        model: a diffusers ``PixArtTransformer2DModel`` (weights are only read).
        geometry: shapes of this call (:class:`PixArtGeometry`); K is ``img_idx.shape[1]``.
        latent: (B, C, H, W) latent, as the pipeline passes it. timestep: (B,).
        conditions: ``encoder_hidden_states`` (B, T, caption_channels) and ``encoder_attention_mask``
            (B, T) or None; or the precomputed :func:`text_conditions` entries. PixArt-α 1024 models
            with additional conditions also need ``resolution`` / ``aspect_ratio``.
        img_idx: (B, K) int64 unique image-token indices per sample; K == N is the dense call.
        txt_idx: (B, K_txt) text rows kept in cross-attention (text pruning), or None for all T.
        caches: per ``geometry.cache_specs(reuse)`` name, caches of all N tokens; required when K < N.
            The run's text conditions are stored here too (``text_specs`` names) by the first in-place call.
        prev_noise: (B, out_channels, H, W) previous prediction; required when K < N and ``reuse="noise"``.
        reuse: ``"noise"`` or ``"features"``.
        inplace: write fresh rows into ``caches`` in place (eager). ``False`` is pure (export).
        record_text: also return the cross-attention mass each (kept) text token receives.
    """
    g = geometry
    n, keep = g.num_tokens, img_idx.shape[1]
    dense = check_step(n, keep, caches=caches, prev_noise=prev_noise, reuse=reuse)
    b = latent.shape[0]

    x_all = model.pos_embed(latent)  # (B, N, D): patch embedding on all N tokens (cheap), then gather
    t6, emb_t = model.adaln_single(timestep, _added_cond(model, g, conditions), batch_size=b, hidden_dtype=x_all.dtype)
    text = _text_inputs(model, g, conditions, caches, inplace)
    bias = text["text_bias"].to(x_all.dtype)  # (B, T)
    if txt_idx is not None:
        bias = torch.gather(bias, 1, txt_idx)
    attn_bias = bias[:, None, None, :]  # (B, 1, 1, T'): broadcast over heads and queries
    x = gather_rows(x_all, img_idx)  # (B, K, D)

    fresh: dict[str, torch.Tensor] = {}
    gated: list[tuple[torch.Tensor | None, str]] = []  # features mode: (gate (B, 1, D) or None, cache name)
    mass_sum: torch.Tensor | None = None

    def kv_for_attention(name: str, rows: torch.Tensor) -> torch.Tensor:
        fresh[name] = rows
        return all_rows(caches, name, img_idx, rows, dense=dense, inplace=inplace)

    for i, block in enumerate(model.transformer_blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + t6.reshape(b, 6, -1)
        ).chunk(6, dim=1)  # each (B, 1, D)

        # Self-attention: K queries over the N keys of the cache.
        attn = block.attn1
        nx = block.norm1(x) * (1 + scale_msa) + shift_msa
        q, k, v = (_heads(p(nx), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        k_all = kv_for_attention(f"blocks.{i}.k", k)
        v_all = kv_for_attention(f"blocks.{i}.v", v)
        a = attn.to_out[1](attn.to_out[0](_merge(F.scaled_dot_product_attention(q, k_all, v_all))))
        x = x + gate_msa * a
        if reuse == "features":
            fresh[f"blocks.{i}.attn"] = a
            gated.append((gate_msa, f"blocks.{i}.attn"))

        # Cross-attention of the K rows to the (kept) text; PixArt applies no norm before it.
        attn2 = block.attn2
        q2 = _heads(attn2.to_q(x), attn2.heads)
        if attn2.norm_q is not None:
            q2 = attn2.norm_q(q2)
        tk, tv = text[f"text.{i}.k"], text[f"text.{i}.v"]
        if txt_idx is not None:
            tidx = txt_idx[:, None, :, None].expand(-1, tk.shape[1], -1, tk.shape[-1])
            tk, tv = torch.gather(tk, 2, tidx), torch.gather(tv, 2, tidx)
        if record_text:
            m = text_mass(q2, tk, bias)
            mass_sum = m if mass_sum is None else mass_sum + m
        c = _merge(F.scaled_dot_product_attention(q2, tk.to(q2.dtype), tv.to(q2.dtype), attn_mask=attn_bias))
        c = attn2.to_out[1](attn2.to_out[0](c))
        x = x + c
        if reuse == "features":
            fresh[f"blocks.{i}.cross"] = c
            gated.append((None, f"blocks.{i}.cross"))

        nff = block.norm2(x) * (1 + scale_mlp) + shift_mlp
        f = block.ff(nff)
        x = x + gate_mlp * f
        if reuse == "features":
            fresh[f"blocks.{i}.ff"] = f
            gated.append((gate_mlp, f"blocks.{i}.ff"))

    shift, scale = (model.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)  # (B, 1, D) each

    def project(h: torch.Tensor) -> torch.Tensor:
        return model.proj_out(model.norm_out(h) * (1 + scale) + shift)

    if reuse == "features" and not dense:
        x_full = x_all
        for gate, name in gated:
            full = scatter_rows(caches[name], img_idx, fresh[name], inplace=inplace)  # (B, N, D)
            x_full = x_full + (full if gate is None else gate * full)
        tokens = project(x_full)  # (B, N, P)
    else:
        if reuse == "features" and dense and inplace and caches is not None:
            for _, name in gated:
                scatter_rows(caches[name], img_idx, fresh[name], inplace=True)
        rows = project(x)  # (B, K, P)
        if dense:  # zeros, not empty: every row is overwritten, and traced graphs must not freeze garbage
            base = rows.new_zeros(b, n, g.token_channels)
        else:
            base = patchify(prev_noise, g.patch).to(rows.dtype)
        tokens = scatter_rows(base, img_idx, rows, inplace=dense)
    noise = unpatchify(tokens, g.grid, g.patch, g.out_channels)
    mass = None if mass_sum is None else mass_sum / g.num_layers
    return StepOutput(noise=noise, fresh=fresh, text_mass=mass)


class PromptStage(torch.nn.Module):
    """``forward(encoder_hidden_states, encoder_attention_mask) -> tuple`` of :func:`text_conditions`'s
    tensors in :meth:`PixArtGeometry.text_specs` order: the per-run graph an export ships next to its
    buckets when they take the text K/V as inputs (``geometry.text_kv_inputs``)."""

    def __init__(self, model: torch.nn.Module, geometry: PixArtGeometry) -> None:
        super().__init__()
        self.model = model
        self.geometry = geometry

    def input_names(self) -> list[str]:
        return ["encoder_hidden_states", "encoder_attention_mask"]

    def output_names(self) -> list[str]:
        return list(self.geometry.text_specs())

    def forward(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = text_conditions(self.model, self.geometry, encoder_hidden_states, encoder_attention_mask)
        return tuple(out[name] for name in self.output_names())
