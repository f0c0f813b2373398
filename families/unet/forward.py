"""The pruned U-Net step: DaTo token pruning, cross-attention text pruning, DeepCache step caching.

One functional call of a diffusers ``UNet2DConditionModel`` (SD1.5, SDXL) that mirrors its forward
module by module (resnets, down/up samplers, norms and projections are the model's own modules) and
changes three things:

- **DaTo image-token pruning** in the self-attention (``attn1``) of every ``BasicTransformerBlock``
  at the pruned level (:class:`UNetGeometry`, the highest-resolution level with attention). ``img_idx``
  (B, K) are the kept tokens, chosen per prompt by the ``dynamics`` policy from the change of the noise
  prediction ``|eps_t - eps_{t-1}|`` average-pooled to that level's grid, with one base token per 2x2
  window always kept. Self-attention runs over the K kept tokens only (K queries, K keys); each pruned
  token is restored by copying the attention output of its most similar kept token (cosine similarity
  of the block's normed hidden states, as ToMe / DaTo unmerge). Cross-attention and the feed-forward
  run on every token. K is static per call (one bucket).
- **Cross-attention text-token pruning**: ``txt_idx`` (B, K_txt) gathers the kept text rows once;
  every ``attn2`` computes keys/values of those rows only. ``record_text=True`` (the dense probe step)
  returns the mean cross-attention probability each text token receives, over heads, pixels and
  layers: (B, T).
- **DeepCache step caching** (``step_kind="cached"``): only the outer ``cache_depth`` down blocks
  (without the last one's downsampler) and up blocks run; the input of the first of those up blocks is
  the ``deep`` feature recorded by the last full step. A full step returns it in ``fresh["deep"]``
  (written into ``caches["deep"]`` when ``inplace``).

Exactness: with K = N, all text, and a full step, the result equals diffusers' forward (tested to
<= 1e-5 fp32 for SD1.5 and SDXL configs). A cached step equals a DeepCache reference built from the
diffusers modules. The pruned path is a pure function of its inputs (``inplace=False``): gathers,
``argmax`` and scatters with static shapes only (ONNX-exportable).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tokprune.errors import ConfigError, ShapeError
from tokprune.families.unet.geometry import STEP_KINDS, UNetGeometry
from tokprune.pruning.forward import StepOutput, gather_rows


class _Ctx:
    """Per-call state shared by every transformer block."""

    def __init__(self, g: UNetGeometry, img_idx: torch.Tensor | None, record_text: bool) -> None:
        self.g = g
        self.idx = img_idx  # (B, K) kept tokens of the pruned level, or None = keep all
        self.rest: torch.Tensor | None = None  # (B, N - K) pruned tokens
        self.record_text = record_text
        self.mass: torch.Tensor | None = None  # (B, T') summed over layers
        self.layers = 0
        if img_idx is not None:
            b, n = img_idx.shape[0], g.num_tokens
            keep = img_idx.shape[1]
            order = torch.arange(n, device=img_idx.device).expand(b, n)
            # unique keys: pruned tokens j -> j, kept tokens -> N + j; the N - K smallest are the pruned
            # tokens in token order (TopK with a static k: ONNX-exportable, unlike a stable sort)
            key = order.scatter(1, img_idx, img_idx + n)
            self.rest = torch.topk(key, n - keep, dim=1, largest=False, sorted=True).indices


def check_supported(unet: torch.nn.Module) -> None:
    """Raise :class:`ConfigError` for U-Net features the pruned forward does not mirror."""
    cfg = unet.config
    problems = []
    if cfg.get("class_embed_type") is not None or getattr(unet, "class_embedding", None) is not None:
        problems.append("class embeddings")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg.get('addition_embed_type')!r}")
    if cfg.get("center_input_sample"):
        problems.append("center_input_sample")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        problems.append("encoder_hid_proj (IP-Adapter)")
    if cfg.get("time_cond_proj_dim") is not None:
        problems.append("time_cond_proj_dim (LCM guidance embedding)")
    for blk in list(unet.up_blocks):
        if getattr(blk, "s1", None):
            problems.append("FreeU (call pipe.disable_freeu())")
            break
    for m in unet.modules():
        if type(m).__name__ == "BasicTransformerBlock":
            if m.norm_type != "layer_norm" or m.only_cross_attention or m.pos_embed is not None:
                problems.append(f"BasicTransformerBlock norm_type={m.norm_type!r}/only_cross_attention/pos_embed")
                break
            proc = type(m.attn1.processor).__name__
            if proc not in ("AttnProcessor2_0", "AttnProcessor"):
                problems.append(f"attention processor {proc} (LoRA scale, IP-Adapter, ToMe patches)")
                break
    if problems:
        raise ConfigError(
            f"tokprune's pruned U-Net forward does not support: {', '.join(problems)}; "
            "remove them or call the pipeline without tokprune"
        )


# ---- attention -------------------------------------------------------------------------------
def _attend(attn: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 for a 3-D input without masks, norms or residual (SD's attn1/attn2)."""
    b = x.shape[0]
    q = attn.to_q(x)
    src = x if ctx is None else ctx
    k, v = attn.to_k(src), attn.to_v(src)
    hd = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, hd).transpose(1, 2)
    k = k.view(b, -1, attn.heads, hd).transpose(1, 2)
    v = v.view(b, -1, attn.heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out


def _cross_mass(attn: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, T) mean over heads and pixels of the cross-attention probability each text row receives."""
    b = x.shape[0]
    q = attn.to_q(x)
    k = attn.to_k(ctx)
    hd = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, hd).transpose(1, 2).float()
    kt = k.view(b, -1, attn.heads, hd).transpose(1, 2).float().transpose(-1, -2)  # (B, H, hd, T)
    total = q.new_zeros(b, ctx.shape[1])
    for s in range(0, q.shape[2], chunk):
        p = torch.softmax((q[:, :, s : s + chunk] @ kt) * attn.scale, dim=-1)  # (B, H, c, T)
        total = total + p.sum(dim=2).mean(dim=1)
    return total / q.shape[2]


def _pruned_self_attention(attn: torch.nn.Module, nx: torch.Tensor, c: _Ctx) -> torch.Tensor:
    """DaTo: attention among the K kept tokens; each pruned token copies its most similar kept token's output."""
    kept = gather_rows(nx, c.idx)  # (B, K, D)
    out_k = _attend(attn, kept, None)  # (B, K, D)
    pruned = gather_rows(nx, c.rest)  # (B, N-K, D)
    sim = F.normalize(pruned, dim=-1) @ F.normalize(kept, dim=-1).transpose(1, 2)  # (B, N-K, K)
    src = sim.argmax(dim=-1)  # (B, N-K) position in the kept list
    out = out_k.new_zeros(nx.shape[0], nx.shape[1], out_k.shape[-1])
    d = out_k.shape[-1]
    out = out.scatter(1, c.idx.unsqueeze(-1).expand(-1, -1, d), out_k)
    return out.scatter(1, c.rest.unsqueeze(-1).expand(-1, -1, d), gather_rows(out_k, src))


def _basic_block(blk: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, c: _Ctx, prune: bool) -> torch.Tensor:
    """diffusers' BasicTransformerBlock (norm_type='layer_norm'), attn1 pruned at the pruned level."""
    nx = blk.norm1(x)
    if prune and c.idx is not None:
        a = _pruned_self_attention(blk.attn1, nx, c)
    else:
        a = _attend(blk.attn1, nx, None)
    x = a + x
    if blk.attn2 is not None:
        nx = blk.norm2(x)
        if c.record_text:
            m = _cross_mass(blk.attn2, nx, text)
            c.mass = m if c.mass is None else c.mass + m
            c.layers += 1
        x = _attend(blk.attn2, nx, text) + x
    nx = blk.norm3(x)
    return blk.ff(nx) + x


def _transformer_2d(t2d: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, c: _Ctx, prune: bool) -> torch.Tensor:
    """diffusers' Transformer2DModel, continuous input (conv or linear projections)."""
    b, _, h, w = x.shape
    residual = x
    x = t2d.norm(x)
    if not t2d.use_linear_projection:
        x = t2d.proj_in(x)
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)
    else:
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)
        x = t2d.proj_in(x)
    for blk in t2d.transformer_blocks:
        x = _basic_block(blk, x, text, c, prune)
    if not t2d.use_linear_projection:
        x = x.reshape(b, h, w, inner).permute(0, 3, 1, 2).contiguous()
        x = t2d.proj_out(x)
    else:
        x = t2d.proj_out(x)
        x = x.reshape(b, h, w, inner).permute(0, 3, 1, 2).contiguous()
    return x + residual


def _down(block, x, emb, text, c: _Ctx, prune: bool, *, downsample: bool = True):
    states = ()
    attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, t2d in zip(block.resnets, attns):
        x = resnet(x, emb)
        if t2d is not None:
            x = _transformer_2d(t2d, x, text, c, prune)
        states = states + (x,)
    if downsample and block.downsamplers is not None:
        for ds in block.downsamplers:
            x = ds(x)
        states = states + (x,)
    return x, states


def _up(block, x, res, emb, text, c: _Ctx, prune: bool, upsample_size):
    attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, t2d in zip(block.resnets, attns):
        x = torch.cat([x, res[-1]], dim=1)
        res = res[:-1]
        x = resnet(x, emb)
        if t2d is not None:
            x = _transformer_2d(t2d, x, text, c, prune)
    if block.upsamplers is not None:
        for us in block.upsamplers:
            x = us(x, upsample_size)
    return x


def _mid(block, x, emb, text, c: _Ctx):
    x = block.resnets[0](x, emb)
    for t2d, resnet in zip(getattr(block, "attentions", []), block.resnets[1:]):
        x = _transformer_2d(t2d, x, text, c, False)
        x = resnet(x, emb)
    return x


# ---- the step ----------------------------------------------------------------------------------
def unet_forward(
    unet: torch.nn.Module,
    geometry: UNetGeometry,
    *,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
    txt_idx: torch.Tensor | None = None,
    caches: dict[str, torch.Tensor] | None = None,
    step_kind: str = "full",
    inplace: bool = False,
    record_text: bool = False,
) -> StepOutput:
    """One U-Net call with DaTo image pruning, text pruning and DeepCache (module docstring).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (weights only read); :func:`check_supported` features.
        geometry: shapes of the call (:class:`UNetGeometry`).
        sample: (B, C, H, W) latent; timestep (B,) or scalar; encoder_hidden_states (B, T, text_dim).
        text_embeds, time_ids: SDXL's added conditions, (B, pooled_dim) and (B, 6).
        img_idx: (B, K) kept tokens of the pruned level, K >= ``geometry.windows``; None or K = N keeps all.
        txt_idx: (B, K_txt) kept text rows; None keeps all T.
        caches: ``{"deep": (B, C, h, w)}``; read by cached steps, written by full steps when ``inplace``.
        step_kind: ``"full"`` or ``"cached"`` (DeepCache: shallow blocks only).
        record_text: also return ``text_mass`` (B, T') of this call.

    Returns:
        :class:`~tokprune.pruning.forward.StepOutput`: ``noise`` (B, C_out, H, W); ``fresh["deep"]`` on
        full steps; ``text_mass`` when recorded.
    """
    if step_kind not in STEP_KINDS:
        raise ConfigError(f"step_kind={step_kind!r}; expected one of {STEP_KINDS}")
    g = geometry
    cached = step_kind == "cached"
    if cached and (caches is None or "deep" not in caches):
        raise ConfigError("a cached (DeepCache) step needs caches['deep'] from an earlier full step")
    if img_idx is not None:
        keep = img_idx.shape[1]
        if keep == g.num_tokens:
            img_idx = None
        elif keep < g.windows:
            raise ShapeError(
                f"K={keep} image tokens is below the {g.windows} 2x2 windows of the {g.grid} grid; DaTo keeps one "
                "base token per window, so use a keep ratio >= 0.25"
            )
    if g.pooled_dim and (text_embeds is None or time_ids is None):
        raise ConfigError("this SDXL U-Net needs text_embeds and time_ids (added_cond_kwargs)")

    # Embeddings: the model's own helpers, as in UNet2DConditionModel.forward.
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    added = {"text_embeds": text_embeds, "time_ids": time_ids} if g.pooled_dim else {}
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    if txt_idx is not None:
        text = gather_rows(text, txt_idx)  # (B, K_txt, text_dim): every attn2 sees the kept rows only

    c = _Ctx(g, img_idx, record_text)
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    upsample_size = None
    depth = g.cache_depth
    n_down = len(unet.down_blocks)

    x = unet.conv_in(sample)
    res: tuple[torch.Tensor, ...] = (x,)
    for i, block in enumerate(unet.down_blocks):
        if cached and i >= depth:
            break
        x, states = _down(block, x, emb, text, c, i == g.prune_level, downsample=not (cached and i == depth - 1))
        res = res + states

    fresh: dict[str, torch.Tensor] = {}
    ups = list(unet.up_blocks)
    if cached:
        x = caches["deep"]
        start = len(ups) - depth
    else:
        if unet.mid_block is not None:
            x = _mid(unet.mid_block, x, emb, text, c)
        start = 0
    for j in range(start, len(ups)):
        block = ups[j]
        if not cached and j == len(ups) - depth:  # the deep feature DeepCache reuses
            fresh["deep"] = x
            if inplace and caches is not None and "deep" in caches:
                caches["deep"].copy_(x)
        level = n_down - 1 - j  # resolution level this up block works at
        r = res[-len(block.resnets) :]
        res = res[: -len(block.resnets)]
        if j != len(ups) - 1 and forward_upsample_size:
            upsample_size = res[-1].shape[2:]
        x = _up(block, x, r, emb, text, c, level == g.prune_level, upsample_size)

    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    noise = unet.conv_out(x)
    mass = None if c.mass is None else c.mass / max(1, c.layers)
    return StepOutput(noise=noise, fresh=fresh, text_mass=mass)


def noise_tokens(noise: torch.Tensor, geometry: UNetGeometry) -> torch.Tensor:
    """(B, N, C) the noise prediction average-pooled to the pruned level's grid (the dynamics signal)."""
    f = geometry.pool
    if f > 1:
        noise = F.avg_pool2d(noise.float(), kernel_size=f, stride=f, ceil_mode=True)
    b, ch = noise.shape[:2]
    return noise.reshape(b, ch, -1).transpose(1, 2)


def call_conditions(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Normalise a ``UNet2DConditionModel.forward`` call into this module's keyword arguments."""
    names = ("sample", "timestep", "encoder_hidden_states")
    bound = dict(zip(names, args))
    bound.update({k: kwargs[k] for k in names if k in kwargs})
    unsupported = [
        k for k in ("class_labels", "timestep_cond", "attention_mask", "down_block_additional_residuals",
                    "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask")
        if kwargs.get(k) is not None
    ]  # fmt: skip
    if len(args) > 3 or unsupported or kwargs.get("cross_attention_kwargs"):
        raise ConfigError(
            f"tokprune's pruned U-Net does not support {unsupported or 'cross_attention_kwargs / extra positional args'} "
            "(ControlNet, T2I-Adapter, masks, LoRA scale); call tokprune.pruning.remove(pipe) first"
        )
    added = kwargs.get("added_cond_kwargs") or {}
    timestep = bound["timestep"]
    sample = bound["sample"]
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=sample.device)
    if timestep.dim() == 0:
        timestep = timestep[None]
    return {
        "sample": sample,
        "timestep": timestep.expand(sample.shape[0]),
        "encoder_hidden_states": bound["encoder_hidden_states"],
        "text_embeds": added.get("text_embeds"),
        "time_ids": added.get("time_ids"),
        "return_dict": kwargs.get("return_dict", True),
    }
