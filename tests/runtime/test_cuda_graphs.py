"""CUDA-graph bookkeeping of the PyTorch path, on CPU with a stand-in for the capture mechanics.

The stand-in behaves like a CUDA graph where it matters: a capture records the call on the
*addresses* it saw (static input buffers, the caches) and a replay re-runs it writing into the
tensors the capture returned. Nothing here claims the real capture runs; that needs a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tokprune.export.spec import BucketSpec
from tokprune.pruning.geometry import Geometry
from tokprune.export.runners.cuda_graphs import BucketGraphs, CudaGraphError, require_cuda
from tokprune.export.runners import TorchRunner

from tokprune.errors import BackendUnavailableError, ShapeError
from tokprune.models import build_tiny_transformer


class FakeGraph:
    def __init__(self) -> None:
        self.call = None

    def replay(self) -> None:
        fn, args, outs = self.call
        for o, n in zip(outs, fn(*args)):
            o.copy_(n)


class FakeBackend:
    """Records the call made under capture; ``sync_in_warmup`` makes the warm-up raise like sync_debug_mode."""

    def __init__(self) -> None:
        self.capturing: FakeGraph | None = None
        self.warming = False
        self.replays = 0

    def side_stream(self):
        return None

    @contextlib.contextmanager
    def warmup(self, stream, *, check_sync):
        self.warming = check_sync  # only the checked run reports host syncs
        try:
            yield
        finally:
            self.warming = False

    def new_graph(self):
        return FakeGraph()

    @contextlib.contextmanager
    def capture(self, graph, stream):
        self.capturing = graph
        try:
            yield
        finally:
            self.capturing = None

    def replay(self, graph):
        self.replays += 1
        graph.replay()

    def wrap(self, fn):
        def call(*args):
            outs = fn(*args)
            if self.capturing is not None:
                # a real capture computes nothing: hand back garbage the replay must overwrite
                garbage = tuple(torch.full_like(o, float("nan")) if o.is_floating_point() else o.clone() for o in outs)
                self.capturing.call = (fn, args, garbage)
                return garbage
            return outs
        return call


@pytest.fixture(scope="module")
def model():
    return build_tiny_transformer().eval()


@pytest.fixture(scope="module")
def spec(model):
    return BucketSpec(Geometry.from_model(model, batch=2, latent_hw=(16, 16), text_tokens=20), 16)


def graph_runner(model, spec, backend):
    runner = TorchRunner(model, spec, cuda_graphs=True, graph_backend=backend).activate()
    runner._graphs.fn = backend.wrap(runner._graphs.fn)
    return runner


def test_replay_equals_eager_and_inputs_are_copied_each_step(model, spec):
    backend = FakeBackend()
    runner = graph_runner(model, spec, backend)
    assert runner.aliases_outputs
    eager = TorchRunner(model, spec).activate()
    caches = {n: x for n, x in spec.sample_inputs(0).items() if n.startswith("cache.")}
    first_out = None
    for seed in range(3):
        feed = {**spec.sample_inputs(seed), **caches}  # new small inputs, the same cache tensors
        got = runner.infer(feed)
        want = eager.infer(feed)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-5), (seed, name)
        if first_out is None:
            first_out = {n: t.data_ptr() for n, t in got.items()}
        assert {n: t.data_ptr() for n, t in got.items()} == first_out  # static outputs: they alias
    assert runner._graphs.captures == 1 and backend.replays == 3
    assert sorted(runner._graphs.staged) == sorted(n for n in spec.input_names() if not n.startswith("cache."))
    assert all(n.startswith("cache.") for n in runner._graphs.bound)


def test_a_graph_per_set_of_cache_addresses_lru(model, spec):
    backend = FakeBackend()
    runner = graph_runner(model, spec, backend)
    runner._graphs.max_graphs = 2
    for seed in range(3):  # three views: three cache sets
        runner.infer(spec.sample_inputs(seed))
    assert runner._graphs.captures == 3 and len(runner._graphs) == 2


def test_shape_change_is_refused_naming_the_option(model, spec):
    runner = graph_runner(model, spec, FakeBackend())
    feed = spec.sample_inputs(0)
    feed["img_idx"] = feed["img_idx"][:, :8]
    with pytest.raises(ShapeError, match=r"cuda_graphs=True \(tokprune.runtime.load\).* img_idx: got shape \(2, 8\) int64 on "
                                         r"cpu, expected shape \(2, 16\) int64.* or drop the option"):
        runner._graphs(feed)


def test_host_sync_in_warmup_is_a_clear_error(spec):
    backend = FakeBackend()

    calls = []

    def syncing(*args):
        calls.append(backend.warming)
        if backend.warming:
            raise RuntimeError("called a synchronizing CUDA operation")
        return ()

    graphs = BucketGraphs(syncing, spec, "cpu", backend=backend)
    with pytest.raises(CudaGraphError, match=r"host synchronisation .* run without cuda_graphs=True"):
        graphs(spec.sample_inputs(0))
    assert len(graphs) == 0 and calls == [False, True]  # an unchecked warm-up (compile, lazy init), then the checked run


def test_no_cuda_device_is_refused():
    with pytest.raises(BackendUnavailableError, match=r"cuda_graphs=True .* got device cpu"):
        require_cuda("cpu")
    with pytest.raises(BackendUnavailableError, match="none is visible here"):
        require_cuda("cuda", available=lambda: False)


def test_torch_runner_without_a_gpu_refuses_on_activate(model, spec):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: the refusal is for hosts without one")
    runner = TorchRunner(model, spec, device="cpu", cuda_graphs=True)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        runner.activate()
    assert not runner.is_active
