"""Selection policies (cat, dynamics, random), text-token selection, KMeans, positional encoding."""

from __future__ import annotations

import pytest
import torch

from tokprune.errors import ConfigError, TokpruneError
from tokprune.pruning.kmeans import kmeans
from tokprune.pruning.policies import (
    POLICIES,
    CatPolicy,
    make_policy,
    positional_encoding,
    select_text_tokens,
    spread_order,
)

C = 16  # channels of the noise prediction in token layout (patch*patch*out_channels at real sizes: 64)


def _noise(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(b, n, C, generator=torch.Generator().manual_seed(seed))  # (B, N, C)


def _warm(policy, b: int, grid: tuple[int, int], seed: int = 0):
    """reset + one dense and one pruned observe; returns the two predictions."""
    n = grid[0] * grid[1]
    policy.reset(batch=b, grid=grid)
    n0, n1 = _noise(b, n, seed), _noise(b, n, seed + 1)
    policy.observe(n0, dense=True)
    policy.observe(n1, dense=False)
    return n0, n1


def _check_indices(idx: torch.Tensor, b: int, n: int, k: int) -> None:
    assert idx.shape == (b, k)
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly increasing (sorted + unique)"


# --------------------------------------------------------------------------- contract, every policy

CASES = [
    (1, (4, 4), 1),
    (2, (3, 5), 7),
    (2, (5, 3), 15),  # k == N
    (3, (6, 8), 20),
    (1, (1, 7), 3),
    (2, (7, 9), 30),
    (2, (9, 4), 35),  # k == N - 1
]


def test_registry():
    assert POLICIES == ("cat", "dynamics", "random")
    assert isinstance(make_policy("cat"), CatPolicy)
    assert make_policy("cat", num_clusters=7).num_clusters == 7
    with pytest.raises(ConfigError, match="cat.*dynamics.*random"):
        make_policy("tome")
    with pytest.raises(ConfigError, match="num_cluster"):
        make_policy("cat", num_cluster=3)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("b,grid,k", CASES)
def test_select_contract(name, b, grid, k):
    n = grid[0] * grid[1]
    p = make_policy(name, seed=1)
    _warm(p, b, grid)
    for _ in range(3):
        idx = p.select(k)
        _check_indices(idx, b, n, k)
    if k == n:
        assert torch.equal(idx, torch.arange(n).expand(b, n))


@pytest.mark.parametrize("name", POLICIES)
def test_bad_k_and_state(name):
    p = make_policy(name)
    with pytest.raises(TokpruneError, match="reset"):
        p.select(3)
    _warm(p, 2, (3, 4))
    for bad in (0, 13, -1, 2.0, torch.tensor(3), True):
        with pytest.raises(ConfigError, match=r"got k=.*expected 1 <= k <= N=12"):
            p.select(bad)
    with pytest.raises(TokpruneError, match=r"expected \(2, 12, C\)"):
        p.observe(torch.zeros(2, 11, C), dense=True)


@pytest.mark.parametrize("name", POLICIES)
def test_deterministic_for_a_seed(name):
    runs = []
    for _ in range(2):
        p = make_policy(name, seed=5)
        _warm(p, 2, (6, 7), seed=3)
        runs.append([p.select(k) for k in (10, 10, 13)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_random_seeds_differ_and_reset_replays():
    def draws(seed):
        p = make_policy("random", seed=seed)
        p.reset(batch=2, grid=(8, 8))
        a = torch.stack([p.select(16) for _ in range(3)])
        p.reset(batch=2, grid=(8, 8))
        return a, torch.stack([p.select(16) for _ in range(3)])

    a0, a0_again = draws(0)
    a1, _ = draws(1)
    assert torch.equal(a0, a0_again)  # reset re-seeds
    assert not torch.equal(a0, a1)
    assert not torch.equal(a0[0], a0[1])  # consecutive selects differ
    assert not torch.equal(a0[0, 0], a0[0, 1])  # samples of a batch differ


def test_random_is_roughly_uniform():
    p = make_policy("random", seed=0)
    p.reset(batch=4, grid=(4, 5))
    hits = torch.zeros(20)
    for _ in range(100):
        hits += torch.zeros(4, 20).scatter_(1, p.select(5), 1.0).sum(0)
    # each token expected 4*100*5/20 = 100 times; a policy biased to low indices fails this
    assert hits.min() > 60 and hits.max() < 140


# --------------------------------------------------------------------------- CAT


def test_cat_needs_dense_warmup():
    p = make_policy("cat")
    p.reset(batch=1, grid=(4, 4))
    p.observe(_noise(1, 16, 0), dense=False)
    with pytest.raises(ConfigError, match="dense warm-up"):
        p.select(4)
    assert p.select(16).shape == (1, 16)  # k == N needs no reference


def test_cat_reference_is_last_dense_observe():
    p = make_policy("cat")
    p.reset(batch=1, grid=(2, 3))
    a, b = _noise(1, 6, 0), _noise(1, 6, 1)
    p.observe(a, dense=True)
    p.observe(b, dense=False)
    torch.testing.assert_close(p.token_scores(), (b - a).norm(dim=-1))
    c = _noise(1, 6, 2)
    p.observe(c, dense=True)
    # right after a dense step, n_last == n_ref: the score is the change between the last two dense steps
    torch.testing.assert_close(p.token_scores(), (c - a).norm(dim=-1))
    p.observe(b, dense=False)
    torch.testing.assert_close(p.token_scores(), (b - c).norm(dim=-1))


def test_cat_first_pruned_step_after_dense_steps_is_spread_over_the_image():
    """After dense steps with no change at all, every score and count ties: the selection must still
    cover every quadrant, never arange(K) (the top rows of the image)."""
    grid, n, k = (16, 16), 256, 64
    p = make_policy("cat")
    p.reset(batch=1, grid=grid)
    same = _noise(1, n, 0)
    p.observe(same, dense=True)
    p.observe(same, dense=True)
    idx = p.select(k)[0]
    assert not torch.equal(idx, torch.arange(k))
    rows, cols = idx // 16, idx % 16
    quadrants = {(int(r) >= 8, int(c) >= 8) for r, c in zip(rows, cols)}
    assert quadrants == {(False, False), (False, True), (True, False), (True, True)}
    # each quadrant gets a fair share (k/4 +- 25%)
    for q in quadrants:
        share = sum(1 for r, c in zip(rows, cols) if (int(r) >= 8, int(c) >= 8) == q)
        assert 12 <= share <= 20, share


def test_cat_first_pruned_step_scores_the_last_two_dense_predictions():
    grid, n = (8, 8), 64
    p = make_policy("cat", top_divisor=1)  # all k from the (cluster, token) score ranking
    p.reset(batch=1, grid=grid)
    a = torch.zeros(1, n, C)
    b = a.clone()
    b[0, 37] = 5.0  # one token moved between the two dense steps
    p.observe(a, dense=True)
    p.observe(b, dense=True)
    assert 37 in p.select(4)[0].tolist()


def test_cat_reclusters_after_each_dense_observe():
    grid, n = (8, 8), 64
    p = make_policy("cat", num_clusters=6)
    a, b = _noise(1, n, 0), 200.0 * _noise(1, n, 1)  # b: noise dominates the features
    p.reset(batch=1, grid=grid)
    p.observe(a, dense=True)
    p.select(8)
    labels_a = p._labels.clone()
    p.observe(b, dense=True)
    p.select(8)
    expected = kmeans(0.05 * b + positional_encoding(grid, C), 6).labels
    assert torch.equal(p._labels, expected) and not torch.equal(labels_a, expected)


def test_cat_selects_planted_block_then_stalest():
    # one cluster -> ranking is by token score alone: the quarter budget is exactly the block,
    # the fill follows the spread order (all staleness counts are 0 at the start)
    h, w, b = 8, 8, 2
    p = make_policy("cat", num_clusters=1)
    n0 = _noise(b, h * w, 0)
    n1 = n0 + 0.01 * _noise(b, h * w, 1)
    blocks = [[r * w + c for r in (2, 3) for c in (4, 5, 6, 7)], [r * w + c for r in (5, 6, 7) for c in (0, 1)] + [0, 9]]
    for i in range(b):
        n1[i, blocks[i]] += 10.0
    p.reset(batch=b, grid=(h, w))
    p.observe(n0, dense=True)
    p.observe(n1, dense=False)
    idx = p.select(32)  # k1 = 8 = block size, fill 24
    order = spread_order((h, w)).tolist()
    for i in range(b):
        rest = [t for t in order if t not in blocks[i]][:24]  # ties follow the spatial spread order
        assert idx[i].tolist() == sorted(blocks[i] + rest)


def test_cat_prefers_best_cluster_over_best_token():
    h, w = 12, 12
    p = make_policy("cat")  # 20 clusters
    n0 = _noise(1, h * w, 0)
    p.reset(batch=1, grid=(h, w))
    p.observe(n0, dense=True)
    first = p.select(24)[0].tolist()  # computes the clustering (scores all 0)
    labels = p._labels[0]
    sizes = torch.bincount(labels, minlength=20)
    assert int((sizes > 0).sum()) == 20
    # target cluster c: every member changes by 1; outlier token (a bigger cluster) changes by 3
    c = int(labels[h * w - 1])  # the cluster of the last token, far from the first fill
    members = (labels == c).nonzero().flatten().tolist()
    outlier = next(t for t in first if labels[t] != c and sizes[labels[t]] >= 4)
    n1 = n0.clone()
    n1[0, members, 0] += 1.0
    n1[0, outlier, 0] += 3.0
    p.observe(n1, dense=False)
    sel = set(p.select(4 * len(members))[0].tolist())  # k1 == cluster size
    assert set(members) <= sel  # the whole best cluster (mean 1) ...
    assert outlier not in sel  # ... beats the single best token (mean <= 3/4), which the fill skips (count 1)


def test_cat_staleness_fill_rotates_over_all_tokens():
    n, k = 36, 8  # k1 = 2 fixed top tokens, 6 filled per select
    p = make_policy("cat", num_clusters=4)
    noise = _noise(2, n, 0)
    p.reset(batch=2, grid=(6, 6))
    p.observe(noise, dense=True)
    p.observe(noise, dense=False)  # constant scores (all 0)
    covered = torch.zeros(2, n, dtype=torch.bool)
    sizes = []
    for _ in range(6):
        covered.scatter_(1, p.select(k), True)
        sizes.append(covered.sum(1).tolist())
    assert sizes == [[8, 8], [14, 14], [20, 20], [26, 26], [32, 32], [36, 36]]


def test_cat_staleness_decay():
    p = make_policy("cat")
    p.reset(batch=1, grid=(2, 2))
    p.observe(_noise(1, 4, 0), dense=True)
    p.select(4)  # all selected: count 1
    p.select(4)  # 1.5
    assert torch.equal(p._count, torch.full((1, 4), 1.5))


# --------------------------------------------------------------------------- dynamics


def test_dynamics_selects_planted_block():
    h, w, b = 6, 8, 2  # 3 x 4 = 12 windows
    n0 = _noise(b, h * w, 0)
    n1 = n0 + 0.01 * _noise(b, h * w, 1)
    block = [r * w + c for r in (2, 3) for c in (2, 3, 4, 5)]  # exactly windows (1, 1) and (1, 2)
    n1[:, block] += 5.0
    p = make_policy("dynamics")
    p.reset(batch=b, grid=(h, w))
    p.observe(n0, dense=True)
    p.observe(n1, dense=False)
    for i, row in enumerate(p.select(12 + 6).tolist()):  # 12 bases + the 6 other block tokens
        assert set(block) <= set(row), i
    for row in p.select(2).tolist():  # k < #windows: the two best bases, both in the block
        assert set(row) <= set(block)


def test_dynamics_score_and_fallback():
    p = make_policy("dynamics")
    p.reset(batch=1, grid=(3, 3))
    with pytest.raises(ConfigError, match="before any observe"):
        p.select(2)
    a, b, c = _noise(1, 9, 0), _noise(1, 9, 1), _noise(1, 9, 2)
    p.observe(a, dense=True)
    torch.testing.assert_close(p.token_scores(), a.abs().mean(-1))  # one observe: magnitude
    p.observe(b, dense=False)
    p.observe(c, dense=False)
    torch.testing.assert_close(p.token_scores(), (c - b).abs().mean(-1))  # last two observes


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (7, 2), (1, 5)])
def test_dynamics_one_base_per_window(grid):
    h, w = grid
    windows = ((h + 1) // 2) * ((w + 1) // 2)
    win_of = torch.tensor([(r // 2) * ((w + 1) // 2) + c // 2 for r in range(h) for c in range(w)])
    p = make_policy("dynamics")
    _warm(p, 3, grid, seed=7)
    score = p.token_scores()
    for k in sorted({windows, min(windows + 3, h * w - 1)}):
        idx = p.select(k)
        for i in range(3):
            hit = torch.bincount(win_of[idx[i]], minlength=windows)
            assert bool((hit >= 1).all())
            if k == windows:  # exactly the best token of each window
                assert bool((hit == 1).all())
                best = torch.full((windows,), -1.0).scatter_reduce(0, win_of, score[i], "amax")
                torch.testing.assert_close(score[i, idx[i]], best[win_of[idx[i]]])


# --------------------------------------------------------------------------- text tokens


def test_text_tokens_protected_and_top_importance():
    imp = torch.rand(2, 12, generator=torch.Generator().manual_seed(0))
    protect = torch.zeros(2, 12, dtype=torch.bool)
    protect[:, [0, 11]] = True
    imp[:, [0, 11]] = -1.0  # protected tokens have the lowest importance
    idx = select_text_tokens(imp, 5, protect=protect)
    _check_indices(idx, 2, 12, 5)
    for i in range(2):
        top3 = imp[i, 1:11].topk(3).indices + 1
        assert idx[i].tolist() == sorted([0, 11] + top3.tolist())
    assert select_text_tokens(imp, 3)[0].tolist() == sorted(imp[0].topk(3).indices.tolist())
    with pytest.raises(ConfigError, match=r"got up to 2 protected, expected <= k=1"):
        select_text_tokens(imp, 1, protect=protect)
    with pytest.raises(ConfigError, match="got k=13"):
        select_text_tokens(imp, 13)
    assert torch.equal(select_text_tokens(imp, 12, protect=protect), torch.arange(12).expand(2, 12))


# --------------------------------------------------------------------------- KMeans and positional encoding


@pytest.mark.parametrize("init", ["farthest", "even"])
def test_kmeans_recovers_blobs(init):
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0, 0], [20, 0, 0], [0, 20, 0], [0, 0, 20]])
    blob = torch.arange(4).repeat_interleave(25)  # (100,) true blob of each point
    pts = centers[blob] + 0.5 * torch.randn(100, 3, generator=g)
    perms = [torch.randperm(100, generator=g) for _ in range(2)]
    x = torch.stack([pts[pm] for pm in perms])  # (2, 100, 3)
    res = kmeans(x, 4, iters=10, init=init)
    assert res.labels.shape == (2, 100) and res.centroids.shape == (2, 4, 3)
    for i, pm in enumerate(perms):
        pairs = set(zip(blob[pm].tolist(), res.labels[i].tolist()))
        assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # blob <-> cluster is one-to-one
        for bl, cl in pairs:
            torch.testing.assert_close(res.centroids[i, cl], pts[blob == bl].mean(0))


def test_kmeans_empty_clusters_stay_finite():
    x = torch.zeros(1, 5, 3)
    x[0, 3:] = 1.0  # 2 distinct points, 8 clusters
    res = kmeans(x, 8)
    assert bool(torch.isfinite(res.centroids).all())
    assert res.labels[0].tolist() == [0, 0, 0, 1, 1]


def test_positional_encoding_layout():
    pe = positional_encoding((2, 4), 5)  # 2 channels of row/h, 3 of col/w
    assert pe.shape == (8, 5)
    assert pe[:, 0].tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]
    assert pe[:, 4].tolist() == [0, 0.25, 0.5, 0.75] * 2
    assert torch.equal(pe[:, 0], pe[:, 1]) and torch.equal(pe[:, 2], pe[:, 4])


# --------------------------------------------------------------------------- no host sync


def _forbid(monkeypatch, names):
    def boom(*_a, **_k):
        raise AssertionError("host sync in selection code")

    for nm in names:
        monkeypatch.setattr(torch.Tensor, nm, boom)


SYNC = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"]


@pytest.mark.parametrize("name", POLICIES)
def test_no_host_sync(name, monkeypatch):
    b, grid, n = 2, (6, 5), 30
    n0, n1 = _noise(b, n, 0), _noise(b, n, 1)
    p = make_policy(name, seed=2)
    p.reset(batch=b, grid=grid)
    _forbid(monkeypatch, SYNC)
    p.observe(n0, dense=True)
    p.observe(n1, dense=False)
    out = [p.select(k) for k in (1, 9, 9, 29, 30)]
    p.observe(n0, dense=True)  # re-cluster path for cat
    out.append(p.select(12))
    monkeypatch.undo()
    assert [o.shape[1] for o in out] == [1, 9, 9, 29, 30, 12]


def test_text_no_host_sync(monkeypatch):
    imp = torch.rand(2, 10)
    protect = torch.zeros(2, 10, dtype=torch.bool)
    protect[:, 0] = True
    _forbid(monkeypatch, SYNC)
    a = select_text_tokens(imp, 4)
    monkeypatch.undo()
    _forbid(monkeypatch, ["item", "tolist"])  # the protect check reads a CPU tensor only
    b = select_text_tokens(imp, 4, protect=protect)
    monkeypatch.undo()
    assert a.shape == b.shape == (2, 4) and bool((b[:, 0] == 0).all())


def test_dynamics_keeps_scores_of_rows_not_recomputed():
    """Unselected rows are copies of the previous prediction: they must keep their last measured
    dynamics instead of dropping to 0 (which would starve them forever)."""
    pol = make_policy("dynamics")
    pol.reset(batch=1, grid=(4, 4))
    gen = torch.Generator().manual_seed(0)
    n0 = torch.randn(1, 16, 4, generator=gen)
    n1 = n0.clone()
    n1[:, 5] += 10.0  # token 5 changed a lot between the two dense steps
    pol.observe(n0, dense=True)
    pol.observe(n1, dense=True)
    before = pol.token_scores().clone()
    # A pruned step recomputed tokens 0..3 only; token 5's row is a copy of n1.
    n2 = n1.clone()
    n2[:, :4] += 0.01
    pol.observe(n2, dense=False, selected=torch.arange(4).unsqueeze(0))
    after = pol.token_scores()
    assert after[0, 5] == before[0, 5] and after[0, 5] > 1.0
    assert torch.allclose(after[0, :4], torch.full((4,), 0.01), atol=1e-6)
    idx = pol.select(5)
    assert 5 in idx[0]
