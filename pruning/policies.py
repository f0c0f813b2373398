"""Token selection policies: which image tokens to recompute at a pruned denoising step.

Pure tensor code (no diffusers). Every policy follows one life cycle per sampling run::

    policy = make_policy("cat")                       # or "dynamics", "random"
    policy.reset(batch=B, grid=(h, w), device=dev)    # start of a run, N = h * w tokens
    for step in steps:
        idx = policy.select(k)                        # (B, k) int64, sorted, unique; k static
        noise = transformer(..., keep=idx)            # full prediction, token layout (B, N, C)
        policy.observe(noise, dense=(k == N))         # after EVERY transformer call

(a dense step may skip ``select`` and just call ``observe(noise, dense=True)``).

Rules every policy keeps, so selection can run next to an engine without stalling it:
the keep count ``k`` is a Python int and the result has exactly ``k`` entries; all work
stays on the device of the tensors (no ``.item()``, ``.tolist()``, ``.cpu()``, no Python
loop over tokens, no data-dependent shape). Ties are broken by a fixed spatially spread order
of the tokens (:func:`spread_order`), never by raw index, so results are deterministic and a
step with equal scores still covers the whole image.

Under classifier-free guidance the sampler gives a policy one row per prompt (the guided
prediction) and shares the selected indices between both halves of the batch.

``observe`` copies the prediction into the policy's own buffers: the caller may reuse
its output buffer right away.

Example::

    >>> import torch
    >>> from tokprune.pruning.policies import make_policy
    >>> p = make_policy("dynamics")
    >>> p.reset(batch=1, grid=(2, 4))
    >>> p.observe(torch.zeros(1, 8, 4), dense=True)
    >>> n = torch.zeros(1, 8, 4); n[0, 5] = 1.0
    >>> p.observe(n, dense=False)
    >>> p.select(3)   # bases of both 2x2 windows (5 wins its window, 2 on a tie) + best other (0, tie)
    tensor([[0, 2, 5]])
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from tokprune.errors import ConfigError, ShapeError, TokpruneError
from tokprune.pruning.kmeans import kmeans

logger = logging.getLogger(__name__)

__all__ = [
    "SelectionPolicy",
    "CatPolicy",
    "DynamicsPolicy",
    "RandomPolicy",
    "POLICIES",
    "make_policy",
    "select_text_tokens",
    "positional_encoding",
    "spread_order",
]

_REGISTRY: dict[str, type["SelectionPolicy"]] = {}


# --------------------------------------------------------------------------- helpers


def positional_encoding(
    grid: tuple[int, int],
    channels: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain normalised coordinates of each token of a row-major (h, w) grid, repeated.

    Returns (N, channels), N = h * w. The first ``channels // 2`` channels all hold
    ``row / h`` and the remaining ``channels - channels // 2`` all hold ``col / w`` (values
    in [0, 1)). No sin/cos: with CAT's feature ``0.05 * noise + pe`` the squared distance of
    two tokens grows with their spatial distance (about ``C/2 * (drow/h)^2 + C/2 *
    (dcol/w)^2``), so KMeans forms compact spatial regions nudged by the noise.
    """
    h, w = _check_grid(grid)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2:
        raise ConfigError(f"positional_encoding: channels must be an int >= 2; got {channels!r}")
    rows = torch.arange(h, device=device, dtype=dtype) / h  # (h,)
    cols = torch.arange(w, device=device, dtype=dtype) / w  # (w,)
    r = rows.view(h, 1).expand(h, w).reshape(h * w, 1)  # (N, 1) row-major
    c = cols.view(1, w).expand(h, w).reshape(h * w, 1)  # (N, 1)
    half = channels // 2
    return torch.cat([r.expand(-1, half), c.expand(-1, channels - half)], dim=1)  # (N, channels)


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    )
    if not ok:
        raise ConfigError(f"grid must be a pair of ints (h, w) >= 1 (image tokens, row-major); got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ConfigError(
            f"{what}: keep count k must be a Python int in [1, {n}]; got k={k!r}, expected 1 <= k <= N={n}. "
            "Fix the keep schedule (a tensor k would force a host sync)."
        )


def spread_order(grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(N,) int64 token indices of an (h, w) grid in a spatially spread order.

    The order sorts tokens by their bit-reversed Morton (Z-order) code: any prefix of it covers
    the grid evenly (the first four tokens fall in four different quadrants, the first 16 in 16
    sub-quadrants, ...). Selection uses it to break ties, so equal scores never pick the top rows
    of the image in raster order.
    """
    h, w = _check_grid(grid)
    bits = max(1, (max(h, w) - 1).bit_length())
    r = torch.arange(h).view(h, 1).expand(h, w).reshape(-1)  # (N,)
    c = torch.arange(w).view(1, w).expand(h, w).reshape(-1)
    code = torch.zeros_like(r)
    for b in range(bits):  # interleave: row bit b -> 2b + 1, col bit b -> 2b
        code |= ((r >> b) & 1) << (2 * b + 1)
        code |= ((c >> b) & 1) << (2 * b)
    rev = torch.zeros_like(code)
    for b in range(2 * bits):  # reverse the 2*bits-bit code: the finest bits become the most significant
        rev |= ((code >> b) & 1) << (2 * bits - 1 - b)
    return torch.sort(rev, stable=True).indices.to(device)  # (N,)


def _rank_desc_spread(score: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Indices (B, N) by descending score; ties follow ``order`` (spread over the image)."""
    permuted = score[:, order]  # (B, N) scores in spread order
    return order[torch.sort(permuted, dim=1, descending=True, stable=True).indices]


def _rank_asc_spread(score: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Indices (B, N) by ascending score; ties follow ``order``."""
    return order[torch.sort(score[:, order], dim=1, stable=True).indices]


def _take_first(order: torch.Tensor, k: int) -> torch.Tensor:
    """First k columns of a (B, N) ranking, returned sorted ascending: (B, k) int64."""
    return order[:, :k].sort(dim=1).values


def _rank_desc(score: torch.Tensor) -> torch.Tensor:
    """Indices (B, N) by descending score; ties keep the lower index first."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices


# --------------------------------------------------------------------------- base class


class SelectionPolicy:
    """Base of every image-token selection policy (see the module docstring for the cycle).

    Subclasses set ``name`` (which registers them with :func:`make_policy`) and implement
    ``_observe`` and ``_select``; the base class checks arguments, handles ``k == N`` and
    keeps the run's batch, grid and device.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)
        self.batch = 0
        self.grid: tuple[int, int] = (0, 0)
        self.num_tokens = 0
        self.device = torch.device("cpu")
        self._is_reset = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    # -- public API -------------------------------------------------------------------

    def reset(self, *, batch: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> None:
        """Start a sampling run of ``batch`` samples on an (h, w) token grid; drops all state."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"{self.name}.reset: batch must be an int >= 1; got {batch!r}")
        h, w = _check_grid(grid)
        self.batch, self.grid, self.num_tokens = batch, (h, w), h * w
        self.device = torch.device(device)
        self._is_reset = True
        self._reset()

    def observe(self, noise: torch.Tensor, *, dense: bool, selected: torch.Tensor | None = None) -> None:
        """Record the full noise prediction (B, N, C) of the transformer call that just ran.

        ``dense=True`` when all N tokens were freshly computed. ``selected`` (B, K): the rows that
        were freshly computed at a pruned step (the others are copies of the previous prediction);
        policies that measure change over time use it. The tensor is copied.
        """
        self._require_reset("observe")
        if noise.dim() != 3 or noise.shape[0] != self.batch or noise.shape[1] != self.num_tokens:
            raise ShapeError(
                f"{self.name}.observe: noise must be (B, N, C) in token layout; got {tuple(noise.shape)}, "
                f"expected ({self.batch}, {self.num_tokens}, C) for grid {self.grid}"
            )
        if selected is not None and (selected.dim() != 2 or selected.shape[0] != self.batch):
            raise ShapeError(f"{self.name}.observe: selected must be (B, K) with B={self.batch}; got {tuple(selected.shape)}")
        self._observe(noise.detach(), bool(dense), None if dense else selected)

    def select(self, k: int) -> torch.Tensor:
        """Indices of the k tokens to recompute: (B, k) int64, unique, sorted ascending.

        ``k == N`` returns ``arange(N)`` for every sample (and still counts as a selection
        for stateful policies); ``1 <= k < N`` applies the policy.
        """
        self._require_reset("select")
        n = self.num_tokens
        _check_k(k, n, f"{self.name}.select")
        if k == n:
            idx = torch.arange(n, device=self.device).expand(self.batch, n).contiguous()  # (B, N)
            self._selected_all()
            return idx
        return self._select(k)

    # -- subclass hooks ---------------------------------------------------------------

    def _reset(self) -> None:
        """Drop per-run state (called by ``reset`` after batch/grid/device are set)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _reset")

    def _observe(self, noise: torch.Tensor, dense: bool, selected: torch.Tensor | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _observe")

    def _select(self, k: int) -> torch.Tensor:
        """(B, k) sorted unique indices for 1 <= k < N."""
        raise NotImplementedError(f"{type(self).__name__} must implement _select")

    def _selected_all(self) -> None:
        """Hook for ``select(N)``: stateless policies have nothing to update."""
        return None

    def _require_reset(self, what: str) -> None:
        if not self._is_reset:
            raise TokpruneError(
                f"{self.name}.{what}() called before reset(); call policy.reset(batch=..., grid=..., device=...) "
                "at the start of every sampling run"
            )


def _copy_into(buf: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` into ``buf`` (reused when shape matches), returning the buffer."""
    if buf is None or buf.shape != src.shape or buf.device != src.device:
        return src.clone()
    return buf.copy_(src)


# --------------------------------------------------------------------------- CAT


class CatPolicy(SelectionPolicy):
    """CAT Pruning: relative-noise scores, cluster-level top tokens, staleness fill.

    * Reference ``n_ref`` = prediction of the last dense ``observe`` (each dense observe
      replaces it and marks the clustering stale).
    * Token score = ``||n_last[j] - n_ref[j]||_2`` over channels (n_last = latest observe).
      Right after a dense step ``n_last == n_ref`` and that score is 0 everywhere, so the first
      pruned step scores the change between the last two dense predictions instead
      (``||n_ref - n_ref_prev||``): information that exists, not a tie.
    * Clustering (KMeans, ``num_clusters`` clusters, on ``noise_weight * n_ref +
      positional_encoding(grid, C)``) runs lazily at the first select after a dense
      observe (CAT's Algorithm 2: at the first pruned step), i.e. once per run for a schedule
      that is dense only at the start.
    * Cluster score = mean token score of its members. ``k // 4`` tokens are the top tokens
      ranked by (cluster score, token score), both descending; the other ``k - k // 4``
      are the stalest tokens not already taken: per-token count, updated at every select
      as ``count <- 0.5 * count + [selected]``; stalest = lowest count. Ties (all counts are
      equal after dense steps) follow :func:`spread_order`, so the fill covers the image.
    * Dense observes do not touch the staleness counts.

    Options: ``num_clusters=20``, ``kmeans_iters=10``, ``noise_weight=0.05``,
    ``top_divisor=4`` (k1 = k // top_divisor). The defaults follow the paper.

    ``select(k < N)`` before any dense observe raises :class:`ConfigError`: CAT needs a
    dense warm-up step to get its reference.
    """

    name = "cat"

    def __init__(
        self,
        *,
        seed: int = 0,
        num_clusters: int = 20,
        kmeans_iters: int = 10,
        noise_weight: float = 0.05,
        top_divisor: int = 4,
    ) -> None:
        super().__init__(seed=seed)
        for opt, val in (("num_clusters", num_clusters), ("kmeans_iters", kmeans_iters), ("top_divisor", top_divisor)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ConfigError(f"cat: option {opt} must be an int >= 1; got {val!r}")
        self.num_clusters = num_clusters
        self.kmeans_iters = kmeans_iters
        self.noise_weight = float(noise_weight)
        self.top_divisor = top_divisor

    def _reset(self) -> None:
        self._ref: torch.Tensor | None = None  # (B, N, C) last dense prediction
        self._ref_prev: torch.Tensor | None = None  # (B, N, C) the dense prediction before it
        self._last: torch.Tensor | None = None  # (B, N, C) latest prediction
        self._since_dense = 0  # non-dense observes since the last dense one
        self._labels: torch.Tensor | None = None  # (B, N) cluster ids; None = stale
        self._count = torch.zeros(self.batch, self.num_tokens, device=self.device)  # (B, N) staleness
        self._order = spread_order(self.grid, self.device)  # (N,) tie-break order

    def _observe(self, noise: torch.Tensor, dense: bool, selected: torch.Tensor | None) -> None:
        if dense:
            if self._ref is not None:  # keep the previous dense prediction (swap buffers, no copy)
                self._ref_prev, self._ref = self._ref, self._ref_prev
            self._ref = _copy_into(self._ref, noise)
            self._labels = None
            self._since_dense = 0
        else:
            self._since_dense += 1
        self._last = _copy_into(self._last, noise)

    def token_scores(self) -> torch.Tensor:
        """(B, N) float32 relative-noise score of every token (for inspection and tests)."""
        self._require_reference()
        if self._since_dense == 0:  # n_last is n_ref: score the last two dense predictions' change
            if self._ref_prev is None:
                return self._ref.new_zeros(self.batch, self.num_tokens, dtype=torch.float32)
            return (self._ref.float() - self._ref_prev.float()).norm(dim=-1)  # (B, N)
        return (self._last.float() - self._ref.float()).norm(dim=-1)  # (B, N)

    def _require_reference(self) -> None:
        if self._ref is None:
            raise ConfigError(
                "cat.select: CAT needs a dense warm-up: got select(k < N) before any observe(..., dense=True), "
                "expected at least one dense step first. Fix the keep schedule so the first steps keep all N tokens."
            )

    def _clusters(self) -> torch.Tensor:
        if self._labels is None:
            B, N, C = self._ref.shape
            pe = positional_encoding(self.grid, C, device=self._ref.device)  # (N, C)
            feats = self.noise_weight * self._ref.float() + pe  # (B, N, C)
            self._labels = kmeans(feats, min(self.num_clusters, N), iters=self.kmeans_iters).labels  # (B, N)
        return self._labels

    def _select(self, k: int) -> torch.Tensor:
        self._require_reference()
        B, N = self.batch, self.num_tokens
        k1 = k // self.top_divisor
        taken = torch.zeros(B, N, dtype=torch.bool, device=self.device)  # (B, N)
        parts = []
        if k1 > 0:
            score = self.token_scores()  # (B, N)
            labels = self._clusters()  # (B, N)
            nc = min(self.num_clusters, N)
            csum = score.new_zeros(B, nc).scatter_add_(1, labels, score)  # (B, nc)
            ccount = score.new_zeros(B, nc).scatter_add_(1, labels, torch.ones_like(score))
            cmean = csum / ccount.clamp_min(1.0)  # (B, nc); empty clusters hold no tokens
            # lexicographic (cluster score desc, token score desc, spread order): two stable sorts
            by_token = _rank_desc_spread(score, self._order)  # (B, N)
            cs_sorted = cmean.gather(1, labels.gather(1, by_token))  # (B, N) cluster score in that order
            order = by_token.gather(1, _rank_desc(cs_sorted))  # (B, N)
            top = order[:, :k1]  # (B, k1)
            taken.scatter_(1, top, True)
            parts.append(top)
        # stalest = lowest count among tokens not taken; ties follow the spread order
        count = self._count.masked_fill(taken, float("inf"))  # (B, N)
        fill = _rank_asc_spread(count, self._order)[:, : k - k1]  # (B, k - k1)
        parts.append(fill)
        idx = torch.cat(parts, dim=1).sort(dim=1).values  # (B, k), disjoint by construction
        selected = taken.scatter_(1, fill, True)
        self._count.mul_(0.5).add_(selected.float())
        return idx

    def _selected_all(self) -> None:
        self._count.mul_(0.5).add_(1.0)


# --------------------------------------------------------------------------- DaTo


class DynamicsPolicy(SelectionPolicy):
    """DaTo: token dynamics with one base token per 2x2 window.

    * Score = mean over channels of ``|n_t - n_{t-1}|`` (last two observes). With a single
      observe so far the score falls back to ``mean |n_t|`` (prediction magnitude); with
      none, ``select(k < N)`` raises :class:`ConfigError`.
    * Windows tile the (h, w) grid in 2x2 blocks; with an odd h or w the last row/column of
      windows is partial and still counts (``ceil(h/2) * ceil(w/2)`` windows). Each window's
      base is its highest-score token (ties -> lower index).
    * ``k < #windows``: the top-k bases by score. Otherwise all bases plus the top
      ``k - #windows`` other tokens by score. Ties -> lower index.

    On pruned steps only the rows passed as ``observe(..., selected=idx)`` were recomputed; the
    other rows are copies of the previous prediction and would read a dynamics of exactly 0, so
    they keep the score measured when they were last recomputed (otherwise a token skipped once
    would never be picked again). Without ``selected`` every row is re-scored.
    """

    name = "dynamics"

    def _reset(self) -> None:
        self._last: torch.Tensor | None = None  # (B, N, C) n_t
        self._score: torch.Tensor | None = None  # (B, N) latest measured |n_t - n_{t-1}| per token
        self._seen = 0
        h, w = self.grid
        hw, ww = (h + 1) // 2, (w + 1) // 2
        self._windows = hw * ww
        # token index of each window slot, (hw*ww, 4) slots in (dr, dc) row-major order; -1 = padding
        r = torch.arange(2 * hw, device=self.device).view(hw, 2, 1, 1)
        c = torch.arange(2 * ww, device=self.device).view(1, 1, ww, 2)
        r = r.expand(hw, 2, ww, 2)
        c = c.expand(hw, 2, ww, 2)
        tok = torch.where((r < h) & (c < w), r * w + c, torch.full_like(r, -1))  # (hw, 2, ww, 2)
        self._slots = tok.permute(0, 2, 1, 3).reshape(self._windows, 4)  # (W, 4)
        self._order = spread_order(self.grid, self.device)  # (N,) tie-break order

    def _observe(self, noise: torch.Tensor, dense: bool, selected: torch.Tensor | None) -> None:
        if self._last is not None:
            fresh = (noise.float() - self._last.float()).abs().mean(dim=-1)  # (B, N)
            if selected is None or self._score is None:
                self._score = fresh
            else:  # only recomputed rows carry new information
                self._score = self._score.scatter(1, selected, fresh.gather(1, selected))
        self._last = _copy_into(self._last, noise)
        self._seen += 1

    def token_scores(self) -> torch.Tensor:
        """(B, N) float32 dynamics score of every token (for inspection and tests)."""
        if self._seen == 0:
            raise ConfigError(
                "dynamics.select: got select(k < N) before any observe(); expected at least one observed "
                "prediction. Fix the keep schedule so the first step keeps all N tokens."
            )
        if self._seen == 1:
            return self._last.float().abs().mean(dim=-1)  # (B, N) magnitude fallback
        return self._score

    def _select(self, k: int) -> torch.Tensor:
        score = self.token_scores()  # (B, N)
        B, W = self.batch, self._windows
        slots = self._slots  # (W, 4)
        padded = torch.cat([score, score.new_full((B, 1), float("-inf"))], dim=1)  # (B, N+1): index -1 -> -inf
        slot_score = padded[:, slots]  # (B, W, 4)
        best = slot_score.argmax(dim=2, keepdim=True)  # (B, W, 1) first max: lower token index
        bases = slots.expand(B, W, 4).gather(2, best).squeeze(2)  # (B, W) token ids
        if k <= W:
            base_score = slot_score.gather(2, best).squeeze(2)  # (B, W)
            return bases.gather(1, _take_first(_rank_desc(base_score), k)).sort(dim=1).values
        rest = score.scatter(1, bases, float("-inf"))  # bases excluded from the rest
        extra = _rank_desc_spread(rest, self._order)[:, : k - W]  # (B, k - W); ties spread over the image
        return torch.cat([bases, extra], dim=1).sort(dim=1).values


# --------------------------------------------------------------------------- random


class RandomPolicy(SelectionPolicy):
    """Uniform random k-subsets per sample, from a ``torch.Generator`` on the run's device
    seeded with ``seed`` at every ``reset`` (so each run is reproducible). Baseline only."""

    name = "random"

    def _reset(self) -> None:
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(self.seed)

    def _observe(self, noise: torch.Tensor, dense: bool, selected: torch.Tensor | None) -> None:
        return None  # predictions do not matter to this baseline

    def _select(self, k: int) -> torch.Tensor:
        keys = torch.rand(self.batch, self.num_tokens, generator=self._gen, device=self.device)  # (B, N)
        return _take_first(torch.argsort(keys, dim=1), k)


POLICIES: tuple[str, ...] = tuple(sorted(_REGISTRY))  # ("cat", "dynamics", "random")


def make_policy(name: str, *, seed: int = 0, **options) -> SelectionPolicy:
    """Build a selection policy by name (one of :data:`POLICIES`).

    ``options`` are passed to the policy's constructor (e.g. ``num_clusters=20`` for
    ``"cat"``); an unknown name or option raises :class:`ConfigError`.

    >>> make_policy("random", seed=3)
    RandomPolicy(seed=3)
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown selection policy {name!r}; expected one of {POLICIES}")
    try:
        return cls(seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(f"policy {name!r}: bad options {sorted(options)}: {exc}") from exc


# --------------------------------------------------------------------------- text tokens


def select_text_tokens(
    importance: torch.Tensor,
    k: int,
    *,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text tokens to keep: the protected ones, then the highest-importance others.

    Args:
        importance: (B, T) attention mass each text token receives.
        k: Python int in [1, T].
        protect: optional (B, T) bool, True for tokens that must be kept (special tokens).
            Pass it as a CPU tensor (it comes from the tokenizer): then "more than k
            protected" is checked for free and raises :class:`ConfigError`. On another
            device that check would need a host read and is skipped; excess protected
            tokens are then cut by importance.

    Returns:
        (B, k) int64 unique indices, sorted ascending. Ties -> lower index.
    """
    if importance.dim() != 2:
        raise ShapeError(f"select_text_tokens: importance must be (B, T); got shape {tuple(importance.shape)}")
    B, T = importance.shape
    _check_k(k, T, "select_text_tokens")
    key = importance.float()
    if protect is not None:
        if tuple(protect.shape) != (B, T) or protect.dtype != torch.bool:
            raise ShapeError(
                f"select_text_tokens: protect must be a bool tensor of shape {(B, T)}; "
                f"got {protect.dtype} {tuple(protect.shape)}"
            )
        if protect.device.type == "cpu":
            n_prot = protect.sum(dim=1)  # (B,)
            if bool((n_prot > k).any()):  # CPU tensor: no device sync
                raise ConfigError(
                    f"select_text_tokens: more protected tokens than the keep count; got up to "
                    f"{int(n_prot.max())} protected, expected <= k={k}. Raise k or protect fewer tokens."
                )
        key = key.masked_fill(protect.to(key.device, non_blocking=True), float("inf"))
    if k == T:
        return torch.arange(T, device=importance.device).expand(B, T).contiguous()
    return _take_first(_rank_desc(key), k)
