"""Analytic multiply-accumulate counts of one transformer call, per keep bucket.

Counts what :func:`tokprune.pruning.forward.pruned_forward` actually computes (matmuls,
convolutions and attention; elementwise ops, norms, GELU and softmax are not MACs and not
counted, as ``torch.utils.flop_counter`` does not count them either). Per call, batch ``B``
(both CFG halves), ``N`` image tokens, ``T`` text rows, ``K`` kept image rows, ``T'`` kept
text rows, hidden width ``D``:

- patch embedding: a ``p x p`` conv on all N tokens, ``N * D * C_in * p^2``;
- timestep / pooled embedding MLPs: ``256*D + D^2 + pooled*D + D^2`` per sample;
- context embedder on all T rows (gathering happens after it): ``T * joint_dim * D``;
- per block: adaLN modulation linears (``6D^2`` image / ``9D^2`` dual-attention image,
  ``6D^2`` text, ``2D^2`` text in the last, ``context_pre_only`` block) per sample;
  Q/K/V and out projections ``4 K D^2``; text Q/K/V ``3 T' D^2`` (the last block computes
  the text query too, then drops it); attention ``2 * Q * (N + T') * D`` with
  ``Q = K + T'`` queries, ``Q = K`` in the last block (no text queries); FF ``8 K D^2``
  (4x, GELU); text out-projection and FF ``9 T' D^2`` except in the last block;
  SD3.5 dual attention adds ``4 K D^2 + 2 K N D``;
- final adaLN ``2D^2`` per sample and projection ``rows * D * p^2 C_out`` with rows = K
  (``reuse="noise"``) or N (``reuse="features"`` at K < N).

:func:`diffusers_dense_macs` counts the stock diffusers forward instead, whose last block
still runs the T text queries through attention. ``tests/pruning/test_macs.py`` checks both
against ``FlopCounterMode`` (flops / 2) within 2 %.

The text-importance probe (``pruned_forward(..., record_text=True)``, the ``text_mass`` output
of the dense probe bucket) recomputes ``Q K^T`` for all ``K + T'`` queries over all ``N + T'``
keys in every block: :func:`text_mass_macs`, added by ``step_macs(..., probe=True)``. A sampling
run pays it only at :meth:`PrunePlan.probe_steps` (the dense step before each text-pruned
stretch), and :func:`plan_macs` / :func:`mac_fraction` count it there.

Budgets (:func:`mac_fraction`) are relative to :func:`dense_macs`, a dense step as tokprune
runs it (``step_macs(g, N)``, no probe), so an all-dense plan is exactly 1.0.

Example::

    from tokprune.pruning import Geometry, PrunePlan
    from tokprune.pruning.macs import mac_fraction, step_macs
    g = Geometry(batch=2, latent_hw=(128, 128), text_tokens=333, patch=2, in_channels=16, out_channels=16,
                 num_layers=24, heads=24, head_dim=64, joint_attention_dim=4096, pooled_dim=2048)
    step_macs(g, 1024) / step_macs(g, 4096)                      # ~0.30
    mac_fraction(g, PrunePlan.from_ratios([1.0] * 8 + [0.5] * 20, num_tokens=g.num_tokens))  # ~0.67
"""

from __future__ import annotations

from typing import Any

from tokprune.errors import ConfigError
from tokprune.pruning.geometry import REUSE_MODES, Geometry
from tokprune.pruning.plan import ALL, PrunePlan

__all__ = [
    "TIMESTEP_CHANNELS",
    "dense_macs",
    "diffusers_dense_macs",
    "mac_fraction",
    "plan_macs",
    "step_macs",
    "resolve_count",
    "resolve_keeps",
    "text_mass_macs",
]

TIMESTEP_CHANNELS = 256  # diffusers' CombinedTimestepTextProjEmbeddings sinusoid width


def resolve_count(value: int | None, total: int, what: str) -> int:
    """A keep count as a number: None / ALL -> ``total``; refuses anything outside [0, total]."""
    if value is None or value == ALL:
        return total
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > total:
        raise ConfigError(f"{what} = {value!r}; expected an int in [0, {total}] or ALL (-1)")
    return value


def _call_macs(g: Geometry, keep: int, keep_text: int, *, reuse: str, last_text_queries: bool) -> int:
    """MACs of one transformer call for one sample (multiply by B outside)."""
    n, t, d = g.num_tokens, g.text_tokens, g.dim
    k, tk = keep, keep_text
    p2 = g.patch * g.patch
    macs = n * d * g.in_channels * p2  # patch-embed conv, all N tokens
    macs += TIMESTEP_CHANNELS * d + d * d + g.pooled_dim * d + d * d  # timestep + pooled MLPs
    macs += t * g.joint_attention_dim * d  # context embedder, all T rows
    for i in range(g.num_layers):
        last = i == g.num_layers - 1  # context_pre_only
        dual = g.is_dual(i)
        macs += (9 if dual else 6) * d * d  # norm1 modulation linear
        macs += (2 if last else 6) * d * d  # norm1_context modulation linear
        macs += 4 * k * d * d  # to_q, to_k, to_v, to_out[0] on K rows
        macs += 3 * tk * d * d  # add_q, add_k, add_v on T' rows
        queries = k + (tk if (not last or last_text_queries) else 0)
        macs += 2 * queries * (n + tk) * d  # QK^T and AV over N + T' keys
        if dual:  # image-only attention: K queries over N keys
            macs += 4 * k * d * d + 2 * k * n * d
        macs += 8 * k * d * d  # FF 4x
        if not last:  # text out-projection + FF
            macs += 9 * tk * d * d
    macs += 2 * d * d  # norm_out modulation linear
    rows = n if (reuse == "features" and k < n) else k
    macs += rows * d * p2 * g.out_channels  # proj_out
    return macs


def resolve_keeps(geometry: Any, keep: int, keep_text: int | None, reuse: str, *, probe: bool = False) -> tuple[int, int]:
    """(K, K_txt) of one step as counts (ALL / None -> N / T), checked the way every MAC counter needs:
    K = 0 is a reuse step (no call; then K_txt is 0 too and ``probe`` is refused)."""
    if reuse not in REUSE_MODES:
        raise ConfigError(f"reuse={reuse!r}; expected one of {REUSE_MODES}")
    k = resolve_count(keep, geometry.num_tokens, "keep")
    if k == 0:
        if probe:
            raise ConfigError("probe=True on a reuse step (keep = 0): a step without a transformer call measures nothing")
        return 0, 0
    tk = resolve_count(keep_text, geometry.text_tokens, "keep_text")
    if tk == 0:
        raise ConfigError("keep_text = 0; a transformer call keeps at least one text token (or ALL)")
    return k, tk


def text_mass_macs(geometry: Geometry, keep: int | None = None, keep_text: int | None = None) -> int:
    """Extra MACs of the text-importance probe on a call keeping ``keep`` image and ``keep_text`` text rows.

    ``pruned_forward(..., record_text=True)`` scores text tokens by the attention mass they
    receive: per block one more ``Q K^T`` of the ``K + T'`` queries over the ``N + T'`` keys (the
    softmax and sums are not MACs). Defaults: the dense full-text call, where it is
    ``B * L * (N + T)^2 * D``. Batch (both CFG halves) included.
    """
    k = resolve_count(keep, geometry.num_tokens, "keep")
    tk = resolve_count(keep_text, geometry.text_tokens, "keep_text")
    return geometry.batch * geometry.num_layers * (k + tk) * (geometry.num_tokens + tk) * geometry.dim


def step_macs(
    geometry: Any, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False,
    cached: bool = False,
) -> int:
    """MACs of one pruned call keeping ``keep`` image and ``keep_text`` text tokens, for any model
    family: the geometry counts (``geometry.step_macs``; SD3's is :func:`sd3_step_macs`).

    ``keep``: ALL (-1) or N = dense, 0 = reuse step (no call, 0 MACs). ``keep_text``: None or
    ALL = all T. ``probe``: the call also measures text importance (``record_text=True``).
    ``cached``: a step-caching step (:attr:`PrunePlan.step_cache`; only families with step caching
    count it, so it is passed on only when set). Batch (both CFG halves) included.
    """
    if cached:
        return geometry.step_macs(keep, keep_text, reuse, probe=probe, cached=True)
    return geometry.step_macs(keep, keep_text, reuse, probe=probe)


def sd3_step_macs(
    geometry: Geometry, keep: int, keep_text: int | None = None, reuse: str = "noise", *, probe: bool = False
) -> int:
    """SD3 / SD3.5: MACs of one ``pruned_forward`` call (the module docstring's formula; the probe adds
    :func:`text_mass_macs`)."""
    k, tk = resolve_keeps(geometry, keep, keep_text, reuse, probe=probe)
    if k == 0:
        return 0
    macs = geometry.batch * _call_macs(geometry, k, tk, reuse=reuse, last_text_queries=False)
    return macs + (text_mass_macs(geometry, k, tk) if probe else 0)


def dense_macs(geometry: Any) -> int:
    """MACs of one dense step as tokprune runs it (``step_macs(g, N)``): the budget's unit."""
    return step_macs(geometry, ALL)


def diffusers_dense_macs(geometry: Any) -> int:
    """MACs of one stock diffusers forward of the geometry's family (``geometry.diffusers_dense_macs()``)."""
    return geometry.diffusers_dense_macs()


def sd3_diffusers_dense_macs(geometry: Geometry) -> int:
    """MACs of one stock diffusers ``SD3Transformer2DModel`` forward (last block keeps text queries)."""
    return geometry.batch * _call_macs(
        geometry, geometry.num_tokens, geometry.text_tokens, reuse="noise", last_text_queries=True
    )


def plan_macs(geometry: Any, plan: PrunePlan, reuse: str = "noise") -> int:
    """Total MACs of a sampling run following ``plan``: reuse steps cost 0, probe steps add the probe,
    cached steps (:attr:`PrunePlan.step_cache`) count what the family's cached step runs."""
    probes = set(plan.probe_steps())
    return sum(
        step_macs(
            geometry, plan.image_k(s, geometry.num_tokens), plan.text_k(s, geometry.text_tokens), reuse,
            probe=s in probes, cached=plan.is_cached(s),
        )
        for s in range(plan.num_steps)
    )


def mac_fraction(geometry: Any, plan: PrunePlan, reuse: str = "noise") -> float:
    """``plan_macs / (steps * dense_macs)``: the fraction of a dense run's MACs the plan spends.

    Counts everything that runs, the text-importance probe at :meth:`PrunePlan.probe_steps` included.
    """
    return plan_macs(geometry, plan, reuse) / (plan.num_steps * dense_macs(geometry))
