"""Batched KMeans in torch: fixed iteration count, deterministic, no host sync.

Used by the CAT policy to cluster image tokens once per sampling run. Everything stays on
the input's device: the number of iterations is a Python int, the initialisation has no
randomness, and no value is ever read back to the host, so a call can be queued on a
CUDA stream (or captured) without stalling it.

Example::

    >>> import torch
    >>> from tokprune.pruning.kmeans import kmeans
    >>> x = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0)]).unsqueeze(0)  # (1, 10, 2)
    >>> kmeans(x, 2).labels
    tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokprune.errors import ConfigError, ShapeError

__all__ = ["KMeansResult", "kmeans", "INITS"]

INITS: tuple[str, ...] = ("farthest", "even")


class KMeansResult(NamedTuple):
    labels: torch.Tensor  # (B, N) int64, cluster id of every point, in [0, num_clusters)
    centroids: torch.Tensor  # (B, num_clusters, D) float32


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, N, D) x (B, K, D) -> (B, N, K), clamped at 0."""
    d = (x * x).sum(-1, keepdim=True) - 2.0 * torch.bmm(x, c.transpose(1, 2))  # (B, N, K)
    d = d + (c * c).sum(-1).unsqueeze(1)  # + (B, 1, K)
    return d.clamp_min_(0.0)


def _init_farthest(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Farthest-point (maximin) seeding: point 0, then repeatedly the point farthest from all
    centroids chosen so far (ties -> lower index). Deterministic; puts one seed in each of
    ``num_clusters`` well-separated groups."""
    B, N, D = x.shape
    batch = torch.arange(B, device=x.device)
    cents = x.new_empty(B, num_clusters, D)
    cents[:, 0] = x[:, 0]
    min_d = ((x - x[:, :1]) ** 2).sum(-1)  # (B, N)
    for j in range(1, num_clusters):  # static count, no data-dependent control flow
        far = min_d.argmax(dim=1)  # (B,) first maximum on ties
        cents[:, j] = x[batch, far]
        min_d = torch.minimum(min_d, ((x - cents[:, j : j + 1]) ** 2).sum(-1))
    return cents


def _init_even(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Evenly spaced points in index order (round(linspace(0, N-1, K)))."""
    N = x.shape[1]
    idx = torch.linspace(0, N - 1, num_clusters, device=x.device).round().long()  # (K,)
    return x[:, idx].clone()


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    init: str = "farthest",
) -> KMeansResult:
    """Lloyd's KMeans on each of B point sets at once.

    Args:
        x: (B, N, D) points; computed in float32 whatever the input dtype.
        num_clusters: K, a Python int >= 1. K > N is allowed (the extra clusters stay empty).
        iters: number of assign/update rounds, fixed (no convergence test: that would need
            a host read). 10 is plenty for the ~20 clusters CAT uses.
        init: ``"farthest"`` (recommended; maximin seeding from point 0) or ``"even"``
            (points evenly spaced in index order). Both are deterministic.

    Returns:
        :class:`KMeansResult` with ``labels`` (B, N) int64 and ``centroids`` (B, K, D) float32.
        Distance ties go to the lower cluster id. A cluster that ends an update empty keeps
        its previous centroid (so it may win points back later) instead of becoming NaN.
    """
    if x.dim() != 3:
        raise ShapeError(f"kmeans: x must be (B, N, D); got shape {tuple(x.shape)}")
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
        raise ConfigError(f"kmeans: num_clusters must be an int >= 1; got {num_clusters!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ConfigError(f"kmeans: iters must be an int >= 0; got {iters!r}")
    if init not in INITS:
        raise ConfigError(f"kmeans: unknown init {init!r}; expected one of {INITS}")

    x = x.float()
    B, N, D = x.shape
    cents = _init_farthest(x, num_clusters) if init == "farthest" else _init_even(x, num_clusters)  # (B, K, D)
    ones = x.new_ones(B, N)
    for _ in range(iters):
        labels = _sq_dist(x, cents).argmin(dim=2)  # (B, N), first minimum on ties
        sums = x.new_zeros(B, num_clusters, D).scatter_add_(1, labels.unsqueeze(-1).expand(B, N, D), x)
        counts = x.new_zeros(B, num_clusters).scatter_add_(1, labels, ones)  # (B, K)
        means = sums / counts.clamp_min(1.0).unsqueeze(-1)
        cents = torch.where((counts > 0).unsqueeze(-1), means, cents)  # empty cluster: keep centroid
    labels = _sq_dist(x, cents).argmin(dim=2)  # (B, N)
    return KMeansResult(labels=labels, centroids=cents)
