"""TensorRT single engine (one static profile per bucket) from the dynamic graph: what is derivable without TensorRT.

The build goes through a fake ``polygraphy.backend.trt`` (tests/export/test_tensorrt.py) that records
what would be passed to TensorRT; the engine set is checked up to the point where TensorRT is needed.
"""

from __future__ import annotations

import shutil

import jsonschema
import pytest
import torch
from tokprune.export import tensorrt as trt
from tokprune.export.dynamic import GraphSpec
from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify
from tokprune.export.runners.trt import TrtEngineSet
from tokprune.export.spec import Backend
from tokprune.runtime.layout import default_layout, graph_for

from tests.export.test_tensorrt import fake_gpu_host  # noqa: F401 - the fixture
from tokprune.errors import ConfigError, ManifestError


@pytest.fixture
def built(export_half, tmp_path, fake_gpu_host):  # noqa: F811
    directory = tmp_path / "copy"
    shutil.copytree(export_half["dir"], directory)
    engines = trt.build_engines(directory, progress=False)  # the default layout: single
    return directory, engines, fake_gpu_host


def test_profiles_are_exactly_the_buckets_min_opt_max(export_half):
    m = load_manifest(export_half["dir"])
    specs = m.bucket_specs()
    graph = GraphSpec.from_buckets(specs)
    profiles = trt.graph_profile_shapes(graph)
    assert list(profiles) == [k for k in specs if not specs[k].record_text]
    for key, shapes in profiles.items():
        spec = specs[key]
        assert list(shapes) == graph.input_names()
        for name, (lo, opt, hi) in shapes.items():
            assert lo == opt == hi
        own = {t.name: t.shape for t in spec.inputs()}
        assert all(shapes[n][0] == s for n, s in own.items())  # the bucket's own inputs at its own shapes
        assert shapes["img_idx"][0] == (spec.geometry.batch, spec.image_keep)


def test_one_engine_with_a_profile_per_bucket_is_built_and_recorded(built):
    directory, engines, fake = built
    m = load_manifest(directory)
    jsonschema.validate(m.data, MANIFEST_SCHEMA)
    assert verify(directory) == []
    graph = GraphSpec.from_buckets(m.bucket_specs())
    assert engines["layout"] == "single-engine" and engines["profiles"] == {k: i for i, k in enumerate(graph.keys)}
    path, profiles = m.single_engine()
    assert path == directory / "engines" / "graph.plan" and path.read_bytes().endswith(b"graph.onnx")
    assert profiles == engines["profiles"]
    graph_builds = [c for c in fake.calls if c[0] == "build" and c[1].endswith("graph.onnx")]
    assert len(graph_builds) == 1
    config = next(c[1] for c in fake.calls if c[0] == "config")
    assert [dict(p) for p in config["profiles"]] == list(trt.graph_profile_shapes(graph).values())
    probes = [k for k in m.keys if k.endswith("-probe")]
    assert sum(c[0] == "build" for c in fake.calls) == 1 + len(probes)  # the probe variant keeps its own engine
    for key in m.keys:
        assert (m.engine_path(key) is not None) == (key in probes)


def test_rebuild_per_bucket_drops_the_single_engine(built):
    directory, _, _ = built
    engines = trt.build_engines(directory, progress=False, rebuild=True, layout="per-bucket")
    m = load_manifest(directory)
    assert engines["layout"] == "engine-per-bucket" and m.single_engine() is None
    assert not (directory / "engines" / "graph.plan").exists() and verify(directory) == []
    assert all(m.engine_path(k).is_file() for k in m.keys)


def test_layout_choice_and_refusals(built, export_dense, tmp_path, fake_gpu_host):  # noqa: F811
    directory, _, _ = built
    m = load_manifest(directory)
    cuda = torch.device("cuda")
    assert default_layout(m, Backend.TENSORRT, cuda) == "single"
    assert default_layout(m, Backend.ONNXRUNTIME, cuda) == "single"
    assert default_layout(m, Backend.ONNXRUNTIME, torch.device("cpu")) == "per-bucket"
    assert graph_for(m, m.bucket_specs(), "single", Backend.TENSORRT).keys == list(m.single_engine()[1])
    with pytest.raises(ConfigError, match="layout 'fused' is not one of"):
        trt.build_engines(directory, progress=False, rebuild=True, layout="fused")
    dense = tmp_path / "dense"
    shutil.copytree(export_dense["dir"], dense)
    with pytest.raises(ConfigError, match=r"no dynamic graph .* layout='per-bucket'"):
        trt.build_engines(dense, progress=False, layout="single")
    trt.build_engines(dense, progress=False, layout="per-bucket")
    md = load_manifest(dense)
    with pytest.raises(ManifestError, match="no single dynamic graph"):
        graph_for(md, md.bucket_specs(), "single", Backend.TENSORRT)


def test_engine_set_maps_every_graph_bucket_to_the_one_engine(built):
    directory, _, _ = built
    m = load_manifest(directory)
    specs = m.bucket_specs()
    graph = GraphSpec.from_buckets(specs)
    paths = {k: m.engine_path(k) for k in specs}
    engine_set = TrtEngineSet(paths, specs, device="cuda", single=m.single_engine(), graph=graph)
    assert {engine_set.paths[k] for k in graph.keys} == {directory / "engines" / "graph.plan"}
    for key in graph.keys:
        assert engine_set.input_shapes(key) == graph.profiles()[key]
    with pytest.raises(ManifestError, match="profiles .* are not the dynamic graph's buckets"):
        TrtEngineSet(paths, specs, device="cuda", single=(m.single_engine()[0], {"k9999-t0001": 0}), graph=graph)
