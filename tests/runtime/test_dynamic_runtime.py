"""The runtime on the single dynamic-K graph: one ONNX Runtime session for every bucket, same images."""

from __future__ import annotations

import numpy as np
import pytest
from tokprune.export.runners import SharedOrtSession

from tests.runtime.conftest import clone_pipe, generate
from tokprune import pruning, runtime
from tokprune.errors import BackendUnavailableError, ConfigError, ManifestError


@pytest.fixture(scope="module")
def single_rt(pruned_export):
    rt = runtime.load(pruned_export, backend="onnxruntime", layout="single")
    yield rt
    rt.close()


def test_buckets_share_one_session_of_the_one_graph(pruned_export, single_rt):
    runners = single_rt.runners
    graph_runners = [r for k, r in runners.items() if not k.endswith("-probe")]
    assert len(graph_runners) == 2
    assert all(r.path.name == "graph.onnx" and isinstance(r.shared, SharedOrtSession) for r in graph_runners)
    assert len({id(r._session) for r in graph_runners}) == 1  # weights loaded once
    probe = [r for k, r in runners.items() if k.endswith("-probe")]
    assert probe and probe[0].graph is None  # the text-mass probe keeps its static graph
    dense = next(r for r in graph_runners if r.spec.dense)
    caches = [n for n in dense._stand_ins if n.startswith("cache.")]
    assert caches and len({dense._stand_ins[n].data_ptr() for n in caches}) == 1


def test_single_graph_generates_the_eager_samplers_image(pruned_export, single_rt, tiny_pipe):
    sched = runtime.load(pruned_export, backend="onnxruntime", check_files=False).manifest.schedule()
    pipe = clone_pipe(tiny_pipe)
    pruning.apply(pipe, sched.to_plan(), policy="cat")
    try:
        reference = generate(pipe)
    finally:
        pruning.remove(pipe)
    pipe = clone_pipe(tiny_pipe)
    runtime.attach(pipe, single_rt)
    got = generate(pipe)
    runtime.detach(pipe)
    assert single_rt.calls == 3
    assert np.abs(got - reference).max() <= 1e-4


def test_session_is_released_with_the_last_runner(pruned_export):
    rt = runtime.load(pruned_export, backend="onnxruntime", layout="single", check_files=False)
    shared = next(r.shared for r in rt.runners.values() if r.graph is not None)
    assert shared.users == 2 and shared.session is not None
    rt.close()
    assert shared.users == 0 and shared.session is None


def test_default_layout_on_cpu_is_per_bucket(pruned_export):
    rt = runtime.load(pruned_export, backend="onnxruntime", check_files=False)
    assert all(r.graph is None and r.path.name != "graph.onnx" for r in rt.runners.values())
    rt.close()


def test_layout_refusals(pruned_export, dense_export):
    with pytest.raises(ConfigError, match=r"layout 'both' is not one of \['single', 'per-bucket'\]"):
        runtime.load(pruned_export, layout="both", check_files=False)
    with pytest.raises(ManifestError, match=r"no single dynamic graph .* layout='per-bucket'"):
        runtime.load(dense_export, layout="single", check_files=False)


def test_cuda_graph_option_refusals(pruned_export):
    with pytest.raises(ConfigError, match=r"cuda_graphs=True .* backend='torch' and 'tensorrt'.* Drop cuda_graphs"):
        runtime.load(pruned_export, backend="onnxruntime", cuda_graphs=True, check_files=False)
    with pytest.raises(BackendUnavailableError, match=r"cuda_graphs=True .*needs a CUDA device, got device cpu"):
        runtime.load(pruned_export, backend="torch", device="cpu", cuda_graphs=True, check_files=False)


def test_a_static_file_passed_as_the_graph_is_refused(pruned_export):
    from tokprune.export.dynamic import GraphSpec
    from tokprune.export.manifest import load_manifest
    from tokprune.export.runners import OnnxRuntimeRunner

    from tokprune.errors import ShapeError

    m = load_manifest(pruned_export)
    specs = m.bucket_specs()
    graph = GraphSpec.from_buckets(specs)
    key = graph.keys[1]
    runner = OnnxRuntimeRunner(m.onnx_path(key), specs[key], graph=graph)  # a static bucket file, not graph.onnx
    with pytest.raises(ShapeError, match=r"differs from bucket .*re-export it"):
        runner.activate()
    assert not runner.is_active and runner.shared.users == 0  # the shared session was given back
