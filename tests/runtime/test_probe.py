"""The text-importance probe on the engine path: a plain dense bucket plus a ``-probe`` variant,
run only at ``plan.probe_steps()``; and special tokens survive text pruning on engines."""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest
import torch

from tests.runtime.conftest import PROMPT, T5_LEN, TEXT, _export, clone_pipe, generate
from tokprune import runtime

DENSE = f"k0256-t{TEXT:04d}"
PROBE = f"{DENSE}-probe"
TEXT_PRUNED = "k0064-t0080"
# dense, dense (probe: text pruning follows), text-pruned, dense (nothing to measure for: plain)
KEYS = [DENSE, DENSE, TEXT_PRUNED, DENSE]


@pytest.fixture(scope="module")
def probe_export(tmp_path_factory, tiny_pipe):
    return _export(tmp_path_factory.mktemp("exports"), tiny_pipe, KEYS, "probe")


class _Count:
    """``EngineExecutor.timer`` stand-in: counts engine calls per bucket key, in order."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def begin(self, key: str) -> None:
        self.keys.append(key)

    def end(self) -> None:
        pass


def test_export_writes_a_plain_dense_bucket_and_its_probe_variant(probe_export):
    from tokprune.export.manifest import MANIFEST_SCHEMA, load_manifest, verify

    m = load_manifest(probe_export)
    assert m.schedule().to_plan().probe_steps() == (1,)
    assert m.keys == [DENSE, PROBE, TEXT_PRUNED]
    specs = m.bucket_specs()
    assert not specs[DENSE].record_text and specs[PROBE].record_text and specs[PROBE].dense
    assert specs[PROBE].output_names() == specs[DENSE].output_names() + ["text_mass"]
    assert specs[PROBE].input_names() == specs[DENSE].input_names()
    # each bucket lists the steps that run it; step_buckets names the probe where it runs
    assert {b["key"]: b["steps"] for b in m.buckets} == {DENSE: [0, 3], PROBE: [1], TEXT_PRUNED: [2]}
    assert m.step_buckets == [DENSE, PROBE, TEXT_PRUNED, DENSE]
    # its own ONNX file, weights shared in weights.bin
    assert {f"{k}.onnx" for k in m.keys} <= {p.name for p in probe_export.glob("*.onnx")}
    assert m.onnx_path(PROBE).stat().st_size < (probe_export / "weights.bin").stat().st_size
    assert verify(probe_export) == []
    jsonschema.validate(json.loads((probe_export / "manifest.json").read_text()), MANIFEST_SCHEMA)


def test_mac_fraction_of_the_export_counts_the_probe(probe_export):
    from tokprune.export.manifest import load_manifest
    from tokprune.pruning.macs import dense_macs, step_macs, text_mass_macs

    m = load_manifest(probe_export)
    g = m.geometry
    plain = 3 * dense_macs(g) + step_macs(g, 64, 80)
    assert m.data["mac_fraction"] == pytest.approx((plain + text_mass_macs(g)) / (4 * dense_macs(g)))


def test_runtime_runs_the_probe_only_at_probe_steps(probe_export, fresh_pipe):
    rt = runtime.load(probe_export, backend="onnxruntime", check_files=False)
    try:
        view = runtime.attach(fresh_pipe, rt)
        count = _Count()
        view.executor.timer = count
        generate(fresh_pipe)
        assert count.keys == [DENSE, PROBE, TEXT_PRUNED, DENSE]  # CFG batch 2 = one engine call per step
        assert Counter(count.keys)[PROBE] == 1
        runtime.detach(fresh_pipe)
        # the dense baseline of the same backend never runs the probe
        dense_view = rt.share(pruned=False)
        runtime.attach(fresh_pipe, dense_view)
        dense_view.executor.timer = count = _Count()
        generate(fresh_pipe)
        assert count.keys == [DENSE] * 4
    finally:
        runtime.detach(fresh_pipe)
        rt.close()


def test_pruned_export_probes_at_step_zero_only(pruned_export, fresh_pipe):
    """conftest's schedule: dense -> text-pruned -> reuse -> text-pruned: one probe, at step 0."""
    rt = runtime.load(pruned_export, backend="onnxruntime", check_files=False)
    try:
        view = runtime.attach(fresh_pipe, rt)
        view.executor.timer = count = _Count()
        generate(fresh_pipe)
        assert count.keys == [PROBE, TEXT_PRUNED, TEXT_PRUNED]  # the reuse step makes no call
    finally:
        runtime.detach(fresh_pipe)
        rt.close()


def test_special_tokens_survive_text_pruning_on_engines(pruned_export, tiny_pipe):
    """The probe is rigged to rank every special token (CLIP BOS/EOS, T5 EOS) least important: the
    txt_idx fed to the engine at text-pruned steps must still hold them, for both CFG halves."""
    from tokprune.pruning.text import special_token_mask

    pipe = clone_pipe(tiny_pipe)
    special = torch.cat([
        special_token_mask(pipe, [""], max_sequence_length=T5_LEN),  # the negative (uncond) half comes first
        special_token_mask(pipe, [PROMPT], max_sequence_length=T5_LEN),
    ])  # (2, T)
    assert special.shape == (2, TEXT) and special[:, :77].sum() >= 4 and special[:, 77:].any()
    rt = runtime.load(pruned_export, backend="onnxruntime", check_files=False)
    fed: list[torch.Tensor] = []
    probe_runner, pruned_runner = rt._engines.runners[PROBE], rt._engines.runners[TEXT_PRUNED]
    probe_infer, pruned_infer = probe_runner.infer, pruned_runner.infer

    def rigged_probe(feed):
        out = dict(probe_infer(feed))
        mass = torch.linspace(1.0, 2.0, TEXT).expand(2, TEXT).clone()
        mass[special] = 0.0  # special tokens: the least attended of all
        out["text_mass"] = mass
        return out

    def recording(feed):
        fed.append(feed["txt_idx"].clone())
        return pruned_infer(feed)

    probe_runner.infer, pruned_runner.infer = rigged_probe, recording
    try:
        runtime.attach(pipe, rt)
        generate(pipe)
    finally:
        runtime.detach(pipe)
        rt.close()
    assert len(fed) == 2  # two text-pruned steps
    for txt_idx in fed:
        assert txt_idx.shape == (2, 80)
        for half in range(2):
            kept = set(txt_idx[half].tolist())
            assert set(special[half].nonzero().flatten().tolist()) <= kept, half
            # the ranking is still used: the rest are the highest-mass ordinary tokens
            ordinary = [t for t in range(TEXT) if not special[half, t]]
            assert kept - set(special[half].nonzero().flatten().tolist()) == set(ordinary[-(80 - int(special[half].sum())):])


def test_detach_restores_encode_prompt(pruned_export, tiny_pipe):
    pipe = clone_pipe(tiny_pipe)
    assert "encode_prompt" not in pipe.__dict__
    runtime.attach(pipe, pruned_export, check_files=False)
    assert "encode_prompt" in pipe.__dict__  # the special-token wrapper
    view = pipe.transformer
    runtime.detach(pipe)
    assert "encode_prompt" not in pipe.__dict__ and pipe.transformer is tiny_pipe.transformer
    view.close()
