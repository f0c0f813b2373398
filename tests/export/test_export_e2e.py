"""tokprune-export end to end on the offline tiny SD3 (budget 0.5 and 1.0), checked against PyTorch and diffusers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import torch
from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify
from tokprune.export.onnx_export import BucketModule
from tokprune.export.runners import OnnxRuntimeRunner

from tests.export.helpers import PROMPT, OrtSampler, run_export
from tokprune.models import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]


def generate(pipe, steps):
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, generator=gen, output_type="np").images


def test_budget_half_exports_every_bucket(export_half):
    assert export_half["rc"] == 0
    d = export_half["dir"]
    m = load_manifest(d)
    assert m.data["budget"] == 0.5 and abs(m.data["mac_fraction"] - 0.5) <= 0.02
    specs = m.bucket_specs()
    assert len(specs) >= 2 and any(s.dense for s in specs.values()) and any(not s.dense for s in specs.values())
    dense_keys = {k for k, s in specs.items() if s.dense and not s.prunes_text}  # plain, and -probe if text is pruned
    assert m.step_buckets[0] in dense_keys
    assert set(k for k in m.step_buckets if k) | dense_keys == set(specs)
    assert all(b["exporter"] == "dynamo" for b in m.buckets)
    assert verify(d) == []
    assert m.data["graph"] is not None  # two or more buckets: the one dynamic-K graph too (export/dynamic.py)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["manifest.json", "schedule.json", "weights.bin", "graph.onnx"] + [f"{k}.onnx" for k in specs])
    assert not any(p.name.endswith(".partial") for p in d.parent.iterdir())  # renamed into place, temp gone


def test_manifests_validate_against_the_schema(export_half, export_dense):
    for e in (export_half, export_dense):
        assert e["rc"] == 0
        data = json.loads((e["dir"] / "manifest.json").read_text())
        jsonschema.validate(data, MANIFEST_SCHEMA)
        assert data["versions"]["tensorrt"] is None and data["engines"] is None
        assert data["model"]["name"] == "sd3-tiny" and (data["height"], data["width"]) == (64, 64)


def test_manifest_records_the_architecture_behind_its_fingerprint(export_dense):
    from tokprune.models import build_tiny_transformer, fingerprint

    data = json.loads((export_dense["dir"] / "manifest.json").read_text())
    recorded = data["transformer_config"]
    assert fingerprint(recorded) == data["model"]["fingerprint"] == fingerprint(build_tiny_transformer("sd3"))
    assert recorded["num_layers"] == build_tiny_transformer("sd3").config.num_layers


def test_schema_file_is_the_one_the_code_uses():
    on_disk = json.loads((ROOT / "engines" / "manifest.schema.json").read_text())
    assert on_disk == MANIFEST_SCHEMA
    jsonschema.Draft202012Validator.check_schema(on_disk)


def test_onnx_io_follows_the_bucket_spec(export_half):
    m = load_manifest(export_half["dir"])
    for key, spec in m.bucket_specs().items():
        graph = onnx.load(str(m.onnx_path(key)), load_external_data=False).graph
        assert [i.name for i in graph.input] == spec.input_names()
        assert [o.name for o in graph.output] == spec.output_names()
        names = set(spec.input_names())
        assert spec.dense == (not any(n.startswith("cache.") for n in names)) == ("prev_noise" not in names)
        assert ("txt_idx" in names) == spec.prunes_text
    dense = m.bucket(m.step_buckets[0].removesuffix("-probe"))
    assert not dense["record_text"] and "text_mass" not in [t["name"] for t in dense["io"]]  # the plain dense bucket
    probe_steps = m.schedule().to_plan().probe_steps()
    if probe_steps:  # its text_mass variant runs at exactly those steps
        probe = m.bucket(dense["key"] + "-probe")
        assert probe["record_text"] and "text_mass" in [t["name"] for t in probe["io"]]
        assert probe["steps"] == list(probe_steps)
    else:
        assert not any(b["record_text"] for b in m.buckets)


def test_every_bucket_matches_pytorch_in_onnxruntime(export_half):
    m = load_manifest(export_half["dir"])
    transformer = build_tiny_pipeline().transformer  # the same weights sd3-tiny loads
    for key, spec in m.bucket_specs().items():
        recorded = m.bucket(key)["equivalence"]
        assert recorded["status"] == "passed" and recorded["worst"] <= 1e-4
        feed = spec.sample_inputs(seed=123)  # another feed than the export-time check
        expected = BucketModule(transformer, spec).run(feed)
        with OnnxRuntimeRunner(m.onnx_path(key), spec) as runner:
            got = runner.infer(feed)
        assert list(got) == spec.output_names()
        for name in expected:
            assert float((got[name] - expected[name]).abs().max()) <= 1e-4, (key, name)


def test_weights_are_stored_once(export_half):
    d = export_half["dir"]
    m = load_manifest(d)
    transformer = build_tiny_pipeline().transformer
    dense_bytes = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    assert m.data["weights"]["dense_weight_bytes"] == dense_bytes
    weights_bin = (d / "weights.bin").stat().st_size
    inline = 0
    for key in m.keys:
        model = onnx.load(str(m.onnx_path(key)), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in init.external_data}
                assert ext["location"] == "weights.bin"
                assert int(ext["offset"]) + int(ext["length"]) <= weights_bin
            else:
                inline += len(init.raw_data)
    stored = weights_bin + inline
    buckets = len(m.keys)
    print(f"\n{buckets} buckets: weights stored {stored} B = {stored / dense_bytes:.3f} x dense weights "
          f"({dense_bytes} B); whole directory {sum(p.stat().st_size for p in d.iterdir())} B")
    assert stored <= 1.15 * dense_bytes  # not buckets x weights
    assert m.data["weights"]["stored_bytes"] == stored
    for key in m.keys:
        assert m.onnx_path(key).stat().st_size < 0.2 * dense_bytes  # graphs carry no weights


def test_budget_one_runs_step_by_step_in_onnxruntime_like_the_dense_pipeline(export_dense):
    assert export_dense["rc"] == 0
    m = load_manifest(export_dense["dir"])
    (key,) = m.keys
    assert m.step_buckets == [key] * export_dense["steps"] and m.bucket_specs()[key].dense
    pipe = build_tiny_pipeline()
    reference = generate(pipe, export_dense["steps"])
    sampler = OrtSampler(export_dense["dir"])
    sampler.install(pipe)
    try:
        image = generate(pipe, export_dense["steps"])
    finally:
        OrtSampler.remove(pipe)
    assert sampler.calls == [key] * export_dense["steps"]
    diff = float(np.abs(image - reference).max())
    assert diff <= 1e-4, diff
    assert float(np.abs(reference).max()) > 0.05  # a real image, not a trivially equal blank


def test_pruned_onnxruntime_loop_matches_the_eager_pruned_sampler(export_half):
    from tokprune import pruning

    m = load_manifest(export_half["dir"])
    schedule = m.schedule()
    pipe = build_tiny_pipeline()
    dense = generate(pipe, schedule.steps)
    pruning.apply(pipe, schedule.to_plan(), policy="random", seed=0, reuse=schedule.reuse)
    try:
        eager = generate(pipe, schedule.steps)
    finally:
        pruning.remove(pipe)
    sampler = OrtSampler(export_half["dir"], policy="random", seed=0)
    sampler.install(pipe)
    try:
        image = generate(pipe, schedule.steps)
    finally:
        OrtSampler.remove(pipe)
    assert sampler.calls == m.step_buckets
    assert float(np.abs(image - eager).max()) <= 1e-4
    assert float(np.abs(eager - dense).max()) > 1e-3  # pruning really changed something


def test_inspect_prints_the_table_and_verifies(export_half, capsys):
    from tokprune.export.cli import inspect_main

    assert inspect_main([str(export_half["dir"]), "--verify", "--io"]) == 0
    out = capsys.readouterr().out
    m = load_manifest(export_half["dir"])
    assert all(k in out for k in m.keys) and "mac_fraction" in out and "cache.blocks.0.k" in out
    assert f"verified: the manifest matches its content hash and {len(m.files())} files match their sha256" in out


def test_corrupted_or_missing_files_are_named(export_half, tmp_path, capsys):
    from tokprune.export.cli import inspect_main

    d = tmp_path / "copy"
    shutil.copytree(export_half["dir"], d)
    with open(d / "weights.bin", "r+b") as fh:  # flip one byte, same size
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    victim = load_manifest(d).keys[-1]
    os.remove(d / f"{victim}.onnx")
    assert inspect_main([str(d), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "corrupted: weights.bin (sha256" in err and f"missing: {victim}.onnx" in err
    problems = verify(d)
    assert len(problems) == 2 and problems[0].startswith("corrupted: weights.bin") and problems[1] == f"missing: {victim}.onnx"


def test_rerun_is_a_no_op_and_another_config_is_refused(export_half, capsys):
    before = (export_half["dir"] / "manifest.json").read_bytes()
    rc, seconds = run_export(export_half["dir"], "--budget", "0.5", "--no-reuse-steps")
    assert rc == 0 and "up to date" in capsys.readouterr().out
    assert (export_half["dir"] / "manifest.json").read_bytes() == before
    rc, _ = run_export(export_half["dir"], "--budget", "0.4", "--no-reuse-steps")
    err = capsys.readouterr().err
    assert rc == 2 and "different configuration" in err and "budget: 0.5 (existing) vs 0.4" in err and "--force" in err
    assert (export_half["dir"] / "manifest.json").read_bytes() == before


def test_export_timings_are_recorded(export_half, export_dense):
    m = load_manifest(export_half["dir"])
    per_bucket = {b["key"]: b["export_seconds"] for b in m.buckets}
    print(f"\nbudget 0.5 export: {export_half['seconds']:.1f} s (buckets {per_bucket}); "
          f"budget 1.0 export: {export_dense['seconds']:.1f} s")
    assert export_dense["seconds"] < 120
