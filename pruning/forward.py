"""The pruned MMDiT forward: one functional step over K selected image tokens.

This is the single implementation used by the eager sampler (``inplace=True``), by the ONNX
export (``inplace=False``, a pure function of its inputs) and by calibration probes.

What one call computes, per joint block ``i`` (as CAT Pruning describes it):

- image stream: only the K selected rows ``x[idx]`` go through norm1 / Q / K / V / out-proj / FF;
  their fresh keys and values are written into the block's K/V cache of all N tokens
  (other rows keep the stale K/V of the step that last computed them);
- attention: K (+ text) queries over all N (+ text) keys; text rows are always computed
  (or the K_txt kept ones when text pruning is on);
- output, two reuse modes:

  * ``reuse="noise"`` (CAT's output rule, the default): the final norm/projection runs on the K
    rows and the other rows of the noise prediction are the previous step's. The residual
    streams of unselected tokens are never read, so only K/V caches are needed.
  * ``reuse="features"``: the un-gated attention / FF outputs of all N tokens are cached too;
    the residual stream of every token is rebuilt from those caches with the *current* gates
    and the final projection runs on all N tokens (no previous-prediction reuse).

Exactness: when ``K == N`` the result equals diffusers' dense forward (attention is invariant
to the order of keys, so the fresh rows are used directly and no cache is read). When the
caches hold what this very input would produce, any K gives the dense result too.

The math mirrors diffusers' ``JointTransformerBlock`` / ``JointAttnProcessor2_0`` for the
version range pinned in pyproject.toml; ``tests/pruning/test_forward.py`` checks it against
the installed diffusers for SD3 and SD3.5 configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tokprune.pruning.geometry import REUSE_MODES, Geometry


@dataclass
class StepOutput:
    """What one pruned call returns.

    ``noise``: (B, C, H, W) noise prediction, the same contract as the dense transformer.
    ``fresh``: per cache name (``Geometry.cache_specs``) the K freshly computed rows, in ``img_idx``
    order; the caller scatters them into its caches (the eager path already did when ``inplace``).
    ``text_mass``: (B, T_kept) mean attention mass each text token received, when requested.
    """

    noise: torch.Tensor
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)
    text_mass: torch.Tensor | None = None


# ---- layout helpers ---------------------------------------------------------------------
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), the inverse of diffusers' unpatchify (channel order p, q, c)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)  # (B, C, h, p, w, q)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W), as diffusers' SD3Transformer2DModel does."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h, w, patch, patch, channels)  # (B, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
    return x.reshape(b, channels, h * patch, w * patch)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D).

    Whole rows by one flat row number each (``Gather`` in ONNX), not an expanded per-element index
    (``GatherElements``, with a (B, K, D) int64 ``Expand`` before it), as :func:`scatter_rows` writes them.
    """
    b, _, d = x.shape
    return x.reshape(-1, d).index_select(0, _flat_rows(x, idx)).view(b, -1, d)


def scatter_rows(dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """Write ``rows`` at token positions ``idx`` of ``dst``.

    dst (B, N, D) with rows (B, K, D), or dst (B, H, N, hd) with rows (B, H, K, hd); idx (B, K).
    ``inplace=False`` returns a new tensor and leaves ``dst`` untouched.

    Whole rows of the last dimension move, addressed by one flat row number each (``index_put``:
    ScatterND in ONNX), not one index per element (``scatter``: ScatterElements, whose ONNX Runtime CPU
    kernel is 5x slower here and single-threaded: at 2 threads the per-block K/V cache writes were
    8 % of a K = 288 PixArt bucket, ``results/pixart/README.md``).
    """
    rows = rows.to(dst.dtype)
    if inplace and not dst.is_contiguous():  # a view cannot be flattened in place: per-element scatter
        if dst.dim() == 3:
            return dst.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), rows)
        return dst.scatter_(2, idx[:, None, :, None].expand(-1, dst.shape[1], -1, dst.shape[-1]), rows)
    width = dst.shape[-1]
    flat, src = _flat_rows(dst, idx), rows.reshape(-1, width)
    if inplace:
        dst.view(-1, width).index_put_((flat,), src)
        return dst
    return dst.reshape(-1, width).index_put((flat,), src).view(dst.shape)


def _flat_rows(dst: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B*K,) or (B*H*K,) row numbers of ``idx``'s tokens in ``dst`` seen as (rows, last dim)."""
    if dst.dim() == 3:
        b, n = dst.shape[:2]
        return (torch.arange(b, device=idx.device)[:, None] * n + idx).reshape(-1)
    b, h, n = dst.shape[:3]
    return (torch.arange(b * h, device=idx.device).view(b, h, 1) * n + idx[:, None, :]).reshape(-1)


def check_step(n: int, keep: int, *, caches: Any, prev_noise: Any, reuse: str) -> bool:
    """Validate one pruned call's state (every family's forward); returns whether it is dense (K == N)."""
    from tokprune.errors import ConfigError

    if reuse not in REUSE_MODES:
        raise ConfigError(f"reuse={reuse!r} is not one of {REUSE_MODES}")
    dense = keep == n
    if not dense and caches is None:
        raise ConfigError(f"K={keep} < N={n} needs the caches of a previous step (got caches=None)")
    if not dense and reuse == "noise" and prev_noise is None:
        raise ConfigError(f"K={keep} < N={n} with reuse='noise' needs prev_noise")
    return dense


def all_rows(caches: dict[str, torch.Tensor] | None, name: str, idx: torch.Tensor, rows: torch.Tensor, *,
             dense: bool, inplace: bool) -> torch.Tensor:  # fmt: skip
    """Rows of all N tokens for attention: the fresh ``rows`` scattered into cache ``name`` at ``idx``.

    Dense calls return the fresh rows themselves (every token, in ``idx`` order: attention is key-order
    invariant) and only write the cache when ``inplace``; pruned calls read the stale rows of the others.
    """
    if dense:
        if inplace and caches is not None:
            scatter_rows(caches[name], idx, rows, inplace=True)
        return rows
    return scatter_rows(caches[name], idx, rows, inplace=inplace)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)  # (B, H, S, hd)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, hd = x.shape
    return x.transpose(1, 2).reshape(b, s, h * hd)  # (B, S, D)


def _qkv(attn: torch.nn.Module, x: torch.Tensor, *, added: bool) -> tuple[torch.Tensor, ...]:
    """Projected, head-split, qk-normed (q, k, v) of one stream."""
    if added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        nq, nk = attn.norm_q, attn.norm_k
    q, k, v = (_heads(t, attn.heads) for t in (q, k, v))  # (B, H, S, hd)
    if nq is not None:
        q = nq(q)
    if nk is not None:
        k = nk(k)
    return q, k, v


def _text_mass(q: torch.Tensor, k: torch.Tensor, n_text: int, chunk: int = 256) -> torch.Tensor:
    """Mean attention probability each of the last ``n_text`` keys receives. q (B,H,Sq,hd), k (B,H,Sk,hd) -> (B, n_text).

    Queries are processed ``chunk`` at a time, so memory is O(B·H·chunk·Sk) rather than the full
    (B, H, Sq, Sk) probability matrix (15 GB at SD3-medium 1024² with batch 8 otherwise).
    """
    scale = q.shape[-1] ** -0.5
    kf = k.float().transpose(-1, -2)  # (B, H, hd, Sk)
    total = q.new_zeros(q.shape[0], n_text, dtype=torch.float32)
    for start in range(0, q.shape[2], chunk):
        probs = torch.softmax((q[:, :, start : start + chunk].float() @ kf) * scale, dim=-1)  # (B, H, c, Sk)
        total = total + probs[..., -n_text:].sum(dim=2).mean(dim=1)  # (B, n_text)
    return total / q.shape[2]


# ---- the step ----------------------------------------------------------------------------
def pruned_forward(
    model: torch.nn.Module,
    geometry: Geometry,
    *,
    latent: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_idx: torch.Tensor,
    txt_idx: torch.Tensor | None = None,
    caches: dict[str, torch.Tensor] | None = None,
    prev_noise: torch.Tensor | None = None,
    reuse: str = "noise",
    inplace: bool = False,
    record_text: bool = False,
) -> StepOutput:
    """Run one transformer call on the selected image (and text) tokens.

    Args:
        model: a diffusers ``SD3Transformer2DModel`` (weights are only read).
        geometry: shapes of this call (:class:`Geometry`); K is ``img_idx.shape[1]``.
        latent: (B, C, H, W) latent, as the pipeline passes it.
        encoder_hidden_states: (B, T, joint_attention_dim); pooled_projections (B, pooled_dim); timestep (B,).
        img_idx: (B, K) int64, per sample K unique image-token indices. K == N is the dense call.
        txt_idx: (B, K_txt) text rows to keep (text pruning), or None for all T.
        caches: per ``geometry.cache_specs(reuse)`` name, the caches of all N tokens. Required when K < N;
            ignored (may be None) when K == N, except that ``inplace`` writes into them if given.
        prev_noise: (B, C, H, W) previous prediction; required when K < N and ``reuse="noise"``.
        reuse: ``"noise"`` or ``"features"`` (module docstring).
        inplace: write fresh rows into ``caches`` in place (eager path). ``False`` is pure (export).
        record_text: also return the attention mass text tokens receive (dense text-pruning warm-up).
    """
    g = geometry
    n, keep = g.num_tokens, img_idx.shape[1]
    dense = check_step(n, keep, caches=caches, prev_noise=prev_noise, reuse=reuse)

    # Embeddings: patch embedding runs on all N tokens (cheap: ~p²C MACs/token) then gathers K rows.
    x_all = model.pos_embed(latent)  # (B, N, D)
    temb = model.time_text_embed(timestep, pooled_projections)  # (B, D)
    ctx = model.context_embedder(encoder_hidden_states)  # (B, T, D)
    if txt_idx is not None:
        ctx = gather_rows(ctx, txt_idx)  # (B, K_txt, D)
    x = gather_rows(x_all, img_idx)  # (B, K, D)

    fresh: dict[str, torch.Tensor] = {}
    gated_parts: list[tuple[torch.Tensor, str]] = []  # features mode: (gate (B, D), cache name)
    mass_sum: torch.Tensor | None = None

    def kv_for_attention(name: str, rows: torch.Tensor) -> torch.Tensor:
        fresh[name] = rows
        return all_rows(caches, name, img_idx, rows, dense=dense, inplace=inplace)

    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        if block.use_dual_attention:
            nx, g_msa, shift_mlp, scale_mlp, g_mlp, nx2, g_msa2 = block.norm1(x, emb=temb)
        else:
            nx, g_msa, shift_mlp, scale_mlp, g_mlp = block.norm1(x, emb=temb)
        if block.context_pre_only:
            nctx = block.norm1_context(ctx, temb)
        else:
            nctx, c_g_msa, c_shift_mlp, c_scale_mlp, c_g_mlp = block.norm1_context(ctx, emb=temb)

        # Joint attention: K image (+ T text) queries over N image + T text keys.
        q, k, v = _qkv(attn, nx, added=False)  # (B, H, K, hd)
        k_img = kv_for_attention(f"blocks.{i}.k", k)  # (B, H, N, hd)
        v_img = kv_for_attention(f"blocks.{i}.v", v)
        tq, tk, tv = _qkv(attn, nctx, added=True)  # (B, H, T, hd)
        # The last block is context_pre_only: its text outputs are discarded, so skip text queries.
        qs = q if block.context_pre_only else torch.cat([q, tq], dim=2)
        keys = torch.cat([k_img, tk], dim=2)  # (B, H, N+T, hd)
        values = torch.cat([v_img, tv], dim=2)
        if record_text:
            m = _text_mass(torch.cat([q, tq], dim=2), keys, ctx.shape[1])
            mass_sum = m if mass_sum is None else mass_sum + m
        out = _merge(F.scaled_dot_product_attention(qs, keys, values, dropout_p=0.0, is_causal=False))
        img_out, txt_out = out[:, :keep], out[:, keep:]
        a = attn.to_out[1](attn.to_out[0](img_out))  # (B, K, D)
        x = x + g_msa.unsqueeze(1) * a
        if reuse == "features":
            fresh[f"blocks.{i}.attn"] = a
            gated_parts.append((g_msa, f"blocks.{i}.attn"))

        if block.use_dual_attention:  # SD3.5: image-only attention, its own K/V cache
            attn2 = block.attn2
            q2, k2, v2 = _qkv(attn2, nx2, added=False)
            k2 = kv_for_attention(f"blocks.{i}.k2", k2)
            v2 = kv_for_attention(f"blocks.{i}.v2", v2)
            a2 = _merge(F.scaled_dot_product_attention(q2, k2, v2, dropout_p=0.0, is_causal=False))
            a2 = attn2.to_out[1](attn2.to_out[0](a2))
            x = x + g_msa2.unsqueeze(1) * a2
            if reuse == "features":
                fresh[f"blocks.{i}.attn2"] = a2
                gated_parts.append((g_msa2, f"blocks.{i}.attn2"))

        nff = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        f = block.ff(nff)
        x = x + g_mlp.unsqueeze(1) * f
        if reuse == "features":
            fresh[f"blocks.{i}.ff"] = f
            gated_parts.append((g_mlp, f"blocks.{i}.ff"))

        if not block.context_pre_only:  # text stream, as in diffusers
            ctx = ctx + c_g_msa.unsqueeze(1) * attn.to_add_out(txt_out)
            nctx = block.norm2_context(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            ctx = ctx + c_g_mlp.unsqueeze(1) * block.ff_context(nctx)

    if reuse == "features" and not dense:
        # Rebuild every token's residual stream from the caches (fresh rows written) with current gates.
        x_full = x_all
        for gate, name in gated_parts:
            full = scatter_rows(caches[name], img_idx, fresh[name], inplace=inplace)  # (B, N, D)
            x_full = x_full + gate.unsqueeze(1) * full
        tokens = model.proj_out(model.norm_out(x_full, temb))  # (B, N, P)
    else:
        if reuse == "features" and dense and inplace and caches is not None:
            for _, name in gated_parts:
                scatter_rows(caches[name], img_idx, fresh[name], inplace=True)
        rows = model.proj_out(model.norm_out(x, temb))  # (B, K, P)
        if dense:  # zeros, not empty: every row is overwritten, and traced graphs must not freeze garbage
            base = rows.new_zeros(g.batch, n, g.token_channels)
        else:
            base = patchify(prev_noise, g.patch).to(rows.dtype)  # (B, N, P)
        tokens = scatter_rows(base, img_idx, rows, inplace=dense)  # dense: every row is written
    noise = unpatchify(tokens, g.grid, g.patch, g.out_channels)
    text_mass = None if mass_sum is None else mass_sum / g.num_layers
    return StepOutput(noise=noise, fresh=fresh, text_mass=text_mass)
