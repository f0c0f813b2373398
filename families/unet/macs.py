"""Analytic multiply-accumulate counts of one U-Net step: dense, DaTo-pruned, text-pruned, cached.

Counts what :func:`tokprune.families.unet.forward.unet_forward` computes (convolutions, linears,
attention matmuls, the DaTo restore similarity; norms, activations, softmax, interpolation are not
MACs, as ``torch.utils.flop_counter`` does not count them either). The U-Net's layout is read from a
model built on the ``meta`` device from the geometry's config (no memory, no weights), so every
layer width and kernel is the model's own. Per step, batch ``B`` (both CFG halves):

- embeddings: timestep MLP (+ SDXL ``add_embedding``) per sample, ``conv_in`` / ``conv_out``;
- resnets: two 3x3 convolutions, the time projection per sample, the 1x1 shortcut;
  down/up samplers: their 3x3 convolution at the output size;
- each ``BasicTransformerBlock`` over N tokens of its level: ``attn1`` Q/K/V/out on R rows and
  attention ``2 R^2 D`` (R = K at the pruned level, else N) plus the restore similarity
  ``(N - K) K D``; ``attn2`` Q/out on N rows, K/V on T' text rows, attention ``2 N T' D``;
  GEGLU feed-forward; ``proj_in`` / ``proj_out``;
- a cached (DeepCache) step counts only the outer ``cache_depth`` down blocks (without the last
  downsampler) and up blocks; the text-importance probe adds one more Q and ``Q K^T`` per ``attn2``.

``tests/families/unet/test_macs.py`` checks it against ``FlopCounterMode`` (flops / 2) within 2 %.

Example::

    from tokprune.families.unet.geometry import UNetGeometry
    from tokprune.families.unet.macs import step_macs
    from tokprune.families.unet.models import unet_config
    g = UNetGeometry.from_config(unet_config("sd15-medium"), batch=2, latent_hw=(64, 64), text_tokens=77)
    step_macs(g, 2048) / step_macs(g, g.num_tokens)            # DaTo at half the tokens of the 64x64 level
"""

from __future__ import annotations

import functools
import json
from typing import Any

from tokprune.errors import ConfigError
from tokprune.families.unet.geometry import UNetGeometry, level_hw
from tokprune.pruning.plan import ALL, PrunePlan

__all__ = ["dense_macs", "mac_fraction", "plan_macs", "step_macs"]


@functools.lru_cache(maxsize=8)
def _meta_unet(config_json: str) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**json.loads(config_json))


def _conv(m: Any, hw: tuple[int, int]) -> int:
    kh, kw = m.kernel_size
    return hw[0] * hw[1] * m.out_channels * (m.in_channels // m.groups) * kh * kw


def _lin(m: Any, rows: int) -> int:
    return rows * m.in_features * m.out_features


def _proj(m: Any, rows: int, hw: tuple[int, int]) -> int:
    return _lin(m, rows) if hasattr(m, "in_features") else _conv(m, hw)


class _Counter:
    def __init__(self, g: UNetGeometry, keep: int, keep_text: int, probe: bool) -> None:
        self.g, self.keep, self.tk, self.probe = g, keep, keep_text, probe

    def resnet(self, r: Any, hw: tuple[int, int]) -> int:
        m = _conv(r.conv1, hw) + _conv(r.conv2, hw)
        if r.time_emb_proj is not None:
            m += r.time_emb_proj.in_features * r.time_emb_proj.out_features  # per sample
        if r.conv_shortcut is not None:
            m += _conv(r.conv_shortcut, hw)
        return m

    def attention(self, a: Any, rows_q: int, rows_kv: int) -> int:
        inner = a.to_q.out_features
        return (_lin(a.to_q, rows_q) + _lin(a.to_k, rows_kv) + _lin(a.to_v, rows_kv) + _lin(a.to_out[0], rows_q)
                + 2 * rows_q * rows_kv * inner)  # fmt: skip

    def block(self, b: Any, n: int, pruned: bool) -> int:
        rows = self.keep if pruned else n
        m = self.attention(b.attn1, rows, rows)
        if pruned and rows < n:
            m += (n - rows) * rows * b.attn1.to_q.in_features  # restore: cosine similarity to kept tokens
        if b.attn2 is not None:
            m += self.attention(b.attn2, n, self.tk)
            if self.probe:
                m += _lin(b.attn2.to_q, n) + _lin(b.attn2.to_k, self.tk) + n * self.tk * b.attn2.to_q.out_features
        m += _lin(b.ff.net[0].proj, n) + _lin(b.ff.net[2], n)
        return m

    def transformer(self, t: Any, hw: tuple[int, int], pruned: bool) -> int:
        n = hw[0] * hw[1]
        m = _proj(t.proj_in, n, hw) + _proj(t.proj_out, n, hw)
        return m + sum(self.block(b, n, pruned) for b in t.transformer_blocks)


def step_macs(
    geometry: UNetGeometry, keep: int, keep_text: int | None = None, reuse: str = "noise", *, cached: bool = False,
    probe: bool = False,
) -> int:
    """MACs of one U-Net step keeping ``keep`` tokens of the pruned level (ALL / N = all, 0 = reuse step:
    no call) and ``keep_text`` text rows (None / ALL = all T). Batch included."""
    g = geometry
    n_tok = g.num_tokens
    k = n_tok if keep in (None, ALL) else int(keep)
    if k == 0:
        return 0
    if not (g.windows <= k <= n_tok):
        raise ConfigError(f"keep={keep}; expected {g.windows}..{n_tok} (one base token per 2x2 window) or ALL")
    tk = g.text_tokens if keep_text in (None, ALL) else int(keep_text)
    if not 1 <= tk <= g.text_tokens:
        raise ConfigError(f"keep_text={keep_text}; expected 1..{g.text_tokens} or ALL")
    u = _meta_unet(g.config_json)
    c = _Counter(g, k, tk, probe)
    n_down, depth = len(u.down_blocks), g.cache_depth
    per_sample = _lin(u.time_embedding.linear_1, 1) + _lin(u.time_embedding.linear_2, 1)
    if getattr(u, "add_embedding", None) is not None:
        per_sample += _lin(u.add_embedding.linear_1, 1) + _lin(u.add_embedding.linear_2, 1)
    macs = _conv(u.conv_in, g.latent_hw) + _conv(u.conv_out, g.latent_hw)
    for i, blk in enumerate(u.down_blocks):
        if cached and i >= depth:
            break
        hw = level_hw(g.latent_hw, i)
        attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
        for r, t in zip(blk.resnets, attns):
            macs += c.resnet(r, hw)
            if t is not None:
                macs += c.transformer(t, hw, i == g.prune_level)
        if blk.downsamplers is not None and not (cached and i == depth - 1):
            macs += sum(_conv(d.conv, level_hw(g.latent_hw, i + 1)) for d in blk.downsamplers)
    if not cached and u.mid_block is not None:
        hw = level_hw(g.latent_hw, n_down - 1)
        macs += c.resnet(u.mid_block.resnets[0], hw)
        for t, r in zip(getattr(u.mid_block, "attentions", []), u.mid_block.resnets[1:]):
            macs += c.transformer(t, hw, False) + c.resnet(r, hw)
    for j, blk in enumerate(u.up_blocks):
        if cached and j < len(u.up_blocks) - depth:
            continue
        level = n_down - 1 - j
        hw = level_hw(g.latent_hw, level)
        attns = getattr(blk, "attentions", None) or [None] * len(blk.resnets)
        for r, t in zip(blk.resnets, attns):
            macs += c.resnet(r, hw)
            if t is not None:
                macs += c.transformer(t, hw, level == g.prune_level)
        if blk.upsamplers is not None:
            macs += sum(_conv(us.conv, level_hw(g.latent_hw, level - 1)) for us in blk.upsamplers)
    return g.batch * (macs + per_sample)  # everything above is per sample


def dense_macs(geometry: UNetGeometry) -> int:
    """One full, dense step: the budget's unit."""
    return step_macs(geometry, ALL)


def plan_macs(geometry: UNetGeometry, plan: PrunePlan) -> int:
    """Total MACs of a run following ``plan`` (reuse steps 0, cached steps shallow only, probes added)."""
    probes = set(plan.probe_steps())
    return sum(
        step_macs(geometry, plan.image_k(s, geometry.num_tokens), plan.text_k(s, geometry.text_tokens),
                  cached=plan.is_cached(s), probe=s in probes)
        for s in range(plan.num_steps)
    )  # fmt: skip


def mac_fraction(geometry: UNetGeometry, plan: PrunePlan) -> float:
    """``plan_macs / (steps * dense_macs)``."""
    return plan_macs(geometry, plan) / (plan.num_steps * dense_macs(geometry))
