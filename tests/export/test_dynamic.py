"""The single dynamic-K graph: one ONNX graph, every bucket's shapes, equal to PyTorch; its profiles; its manifest entry."""

from __future__ import annotations

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokprune.export.dynamic import (
    GRAPH_FILE,
    KEEP_DIM,
    TEXT_DIM,
    GraphSpec,
    export_graph_onnx,
    finalize_graph_onnx,
)
from tokprune.export.equivalence import check_graph_equivalence
from tokprune.export.onnx_export import BucketModule
from tokprune.export.spec import BucketSpec, Precision
from tokprune.pruning.geometry import Geometry

from tokprune.errors import ConfigError, ShapeError
from tokprune.models import build_tiny_transformer


@pytest.fixture(scope="module")
def model():
    return build_tiny_transformer().eval()


@pytest.fixture(scope="module")
def geometry(model) -> Geometry:
    return Geometry.from_model(model, batch=2, latent_hw=(16, 16), text_tokens=20)


@pytest.fixture(scope="module")
def buckets(geometry) -> list[BucketSpec]:
    n = geometry.num_tokens
    return [BucketSpec(geometry, n), BucketSpec(geometry, 32), BucketSpec(geometry, 16), BucketSpec(geometry, 8, 12)]


@pytest.fixture(scope="module")
def exported(model, buckets, tmp_path_factory):
    graph = GraphSpec.from_buckets(buckets)
    out = tmp_path_factory.mktemp("dynamic")
    exporter = export_graph_onnx(model, graph, out / "raw" / "model.onnx")
    proto = finalize_graph_onnx(out / "raw" / "model.onnx", graph)
    onnx.save_model(proto, str(out / GRAPH_FILE), save_as_external_data=True, location=GRAPH_FILE + ".data")
    return graph, out / GRAPH_FILE, exporter


def test_io_table_names_the_keep_axes_and_nothing_else(buckets):
    graph = GraphSpec.from_buckets(buckets)
    shapes = {t.name: t.shape for t in graph.io()}
    assert shapes["img_idx"] == (2, KEEP_DIM) and shapes["txt_idx"] == (2, TEXT_DIM)
    assert shapes["fresh.blocks.0.k"][2] == KEEP_DIM and shapes["cache.blocks.0.k"] == (2, 4, 64, 8)
    symbolic = {t.name for t in graph.io() if any(isinstance(d, str) for d in t.shape)}
    assert symbolic == {"img_idx", "txt_idx"} | {n for n in shapes if n.startswith("fresh.")}
    # every bucket's own I/O is the graph's at that bucket's shapes (names, shapes, dtypes)
    for spec in buckets:
        at = graph.shapes(spec)
        for t in spec.io():
            assert at[t.name] == t.shape


def test_profiles_are_exactly_the_buckets(buckets):
    graph = GraphSpec.from_buckets(buckets)
    profiles = graph.profiles()
    assert list(profiles) == [s.key for s in buckets]
    for spec in buckets:
        p = profiles[spec.key]
        assert list(p) == graph.input_names()
        assert p["img_idx"] == (2, spec.image_keep) and p["txt_idx"] == (2, spec.text_keep)
        assert p["cache.blocks.1.v"] == (2, 4, 64, 8)


def test_probe_variant_and_mixed_buckets_are_refused(geometry):
    n = geometry.num_tokens
    probe = BucketSpec(geometry, n, record_text=True)
    assert GraphSpec.from_buckets([BucketSpec(geometry, n), probe]).keys == [BucketSpec(geometry, n).key]
    with pytest.raises(ConfigError, match="probe"):
        GraphSpec((probe,))
    with pytest.raises(ConfigError, match="precision"):
        GraphSpec((BucketSpec(geometry, n), BucketSpec(geometry, 8, precision=Precision.FP16)))
    with pytest.raises(ShapeError, match="not one of this graph's buckets"):
        GraphSpec((BucketSpec(geometry, n),)).shapes(BucketSpec(geometry, 8))


def test_stand_ins_share_one_buffer_per_shape(buckets):
    graph = GraphSpec.from_buckets(buckets)
    dense = buckets[0]
    stand = graph.stand_in_buffers(dense)
    assert set(stand) == {"txt_idx", "prev_noise"} | {n for n in graph.input_names() if n.startswith("cache.")}
    assert len({stand[n].data_ptr() for n in stand if n.startswith("cache.")}) == 1  # one cache's memory
    assert torch.equal(stand["txt_idx"][1], torch.arange(20))
    feed = graph.adapt_feed(dense, dense.sample_inputs(0), stand)
    assert list(feed) == graph.input_names()


def test_every_bucket_runs_through_the_one_graph_and_equals_pytorch(model, buckets, exported):
    graph, path, exporter = exported
    assert exporter == "dynamo"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in session.get_inputs()] == [t.shape for t in graph.inputs()]
    for seed in (0, 1):
        for spec in buckets:
            # random caches / prev_noise even for the dense bucket: their contents must not matter
            full = graph.sample_inputs(spec, seed)
            ref = BucketModule(model, spec).run({n: full[n] for n in spec.input_names()})
            outs = session.run(graph.output_names(), {n: x.numpy() for n, x in full.items()})
            for name, got in zip(graph.output_names(), outs):
                assert got.shape == tuple(ref[name].shape), (spec.key, name)
                diff = float(np.abs(got - ref[name].numpy()).max())
                assert diff <= 1e-4, (spec.key, name, diff)


def test_dense_through_the_graph_is_the_dense_transformer(model, buckets, exported):
    """K = N through the generic path (caches in, all rows scattered) equals diffusers' own forward."""
    graph, path, _ = exported
    dense = buckets[0]
    full = graph.sample_inputs(dense, 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    noise = session.run(["noise"], {n: x.numpy() for n, x in full.items()})[0]
    with torch.no_grad():
        want = model(hidden_states=full["latent"], encoder_hidden_states=full["encoder_hidden_states"],
                     pooled_projections=full["pooled_projections"], timestep=full["timestep"], return_dict=False)[0]
    assert float(np.abs(noise - want.numpy()).max()) <= 1e-4


def test_equivalence_report_per_bucket(model, exported):
    graph, path, _ = exported
    reports = check_graph_equivalence(model, graph, path)
    assert list(reports) == graph.keys
    assert all(r["status"] == "passed" and r["worst"] <= 1e-4 for r in reports.values())


def test_manifest_describes_the_single_graph(export_half):
    from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify

    m = load_manifest(export_half["dir"])
    entry = m.data["graph"]
    jsonschema.validate(m.data, MANIFEST_SCHEMA)
    assert verify(export_half["dir"]) == []
    keys = [k for k in m.keys if not k.endswith("-probe")]
    assert len(keys) >= 2
    assert [p["bucket"] for p in entry["profiles"]] == keys
    assert m.graph_path() == export_half["dir"] / GRAPH_FILE and m.graph_path().is_file()
    assert entry["file"] in m.files()
    assert set(entry["equivalence"]) == set(keys)
    assert all(r["status"] == "passed" for r in entry["equivalence"].values())
    assert entry["weights"]["new_bytes"] == 0  # the graph's weights are the buckets' bytes, stored once
    graph = GraphSpec.from_buckets(m.bucket_specs())
    assert entry["io"] == [t.to_dict() for t in graph.io()]
    for p in entry["profiles"]:
        assert {n: tuple(s) for n, s in p["shapes"].items()} == graph.profiles()[p["bucket"]]
    # the graph's initializers point into the shared weights.bin
    proto = onnx.load(str(m.graph_path()), load_external_data=False)
    locations = {kv.value for init in proto.graph.initializer for kv in init.external_data if kv.key == "location"}
    assert locations == {"weights.bin"}


def test_single_bucket_exports_have_no_graph(export_dense):
    from tokprune.export.manifest import load_manifest

    m = load_manifest(export_dense["dir"])
    assert m.data["graph"] is None and m.graph_path() is None
    assert not (export_dense["dir"] / GRAPH_FILE).exists()


def test_an_interrupted_exports_graph_is_reused_only_for_the_same_buckets(export_half, tmp_path):
    """The exporter's resume rule: the recorded graph is reused when it serves exactly these buckets and re-hashes."""
    import shutil

    from tokprune.export.exporter import _graph_done
    from tokprune.export.manifest import load_manifest

    work = tmp_path / "work"
    shutil.copytree(export_half["dir"], work)
    m = load_manifest(work)
    entry, specs = m.data["graph"], list(m.bucket_specs().values())
    assert _graph_done(work, entry, specs)
    assert not _graph_done(work, None, specs)
    assert not _graph_done(work, entry, [s for s in specs if not s.dense])  # another schedule's buckets
    with open(work / GRAPH_FILE, "ab") as fh:
        fh.write(b"\0")
    assert not _graph_done(work, entry, specs)  # damaged: traced again
