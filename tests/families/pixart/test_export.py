"""PixArt through the generic export and runtime: calibrate -> export (ONNX per bucket + dynamic graph) ->
ONNX Runtime engines in a PixArtSigmaPipeline; and buckets that take the per-prompt text K/V as inputs."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from tokprune import pruning, runtime
from tokprune.families.pixart import FAMILY
from tokprune.families.pixart.geometry import PixArtGeometry
from tokprune.families.pixart.models import build_tiny_pipeline, build_tiny_transformer

pytestmark = pytest.mark.slow

STEPS, MSL = 8, 24
PROMPT = "a red circle on the left"


def _export(tmp_path_factory, budget):
    from tokprune.export.exporter import ExportConfig, export_model

    out = tmp_path_factory.mktemp(f"pixart-b{budget}") / "engines"
    return export_model(ExportConfig(model="pixart-tiny", budget=budget, steps=STEPS, max_sequence_length=MSL), out,
                        progress=False)


@pytest.fixture(scope="module")
def export_half(tmp_path_factory):
    return _export(tmp_path_factory, 0.5)


def _generate(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=STEPS, max_sequence_length=MSL, output_type="np", clean_caption=False,
                generator=torch.Generator().manual_seed(0), **kw).images


@contextlib.contextmanager
def _engines(pipe, directory):
    view = runtime.attach(pipe, directory, backend="onnxruntime")  # binds the pipeline through the family
    try:
        yield view
    finally:
        runtime.detach(pipe)


def test_every_bucket_matches_pytorch(export_half):
    m = export_half.manifest
    assert m["geometry"]["family"] == "pixart-sigma" and m["geometry"]["out_channels"] == 8
    assert len(m["buckets"]) >= 2 and abs(m["mac_fraction"] - 0.5) <= 0.03
    for bucket in m["buckets"]:
        eq = bucket["equivalence"]
        assert eq["status"] == "passed" and eq["worst"] <= 1e-4, bucket["key"]
    graph = m["graph"]["equivalence"]  # the dynamic-K graph, per bucket
    assert set(graph) == {b["key"] for b in m["buckets"]}
    assert all(r["status"] == "passed" and r["worst"] <= 1e-4 for r in graph.values())


def test_engines_run_the_pipeline_as_the_eager_pruner_does(export_half):
    pipe = build_tiny_pipeline()
    with _engines(pipe, export_half.directory) as view:
        plan = view.plan
        engine = _generate(pipe)
        assert view.calls == sum(k != 0 for k in plan.image_keep)
        assert view._pruner.state.guidance == 4.5  # CFG read from the bound pipeline: one selection per prompt
    pruning.apply(pipe, plan, policy=export_half.manifest["policy"])
    try:
        eager = _generate(pipe)
    finally:
        pruning.remove(pipe)
    dense = _generate(pipe)
    assert np.abs(engine - eager).max() <= 1e-4  # same plan, same selections: only ONNX Runtime's rounding
    assert np.abs(engine - dense).max() > 1e-4  # and it did prune


def test_text_kv_is_computed_once_per_run_by_the_exported_prompt_stage(export_half):
    """The cross-attention K/V depend on the prompt only: the export ships prompt_stage.onnx (checked vs
    PyTorch), the buckets take its outputs, and the runtime runs it once per run, not once per step."""
    m = export_half.manifest
    stage = m["prompt_stage"]
    assert stage["equivalence"]["max_abs"] <= 1e-4
    assert [t["name"] for t in stage["inputs"]] == ["encoder_hidden_states", "encoder_attention_mask"]
    names = {t["name"] for t in stage["outputs"]}
    assert "text_bias" in names and "text.0.k" in names
    for bucket in m["buckets"]:  # the buckets read the stage's tensors, not the prompt's embeddings
        inputs = {t["name"] for t in bucket["io"] if t["role"] == "input"}
        assert names <= inputs and "encoder_hidden_states" not in inputs
    pipe = build_tiny_pipeline()
    with _engines(pipe, export_half.directory) as view:
        real = view._engines.prompt_stage
        calls = []

        class Counting:
            input_names = real.input_names

            def __call__(self, conditions):
                calls.append(1)
                return real(conditions)

        view._engines.prompt_stage = Counting()
        try:
            _generate(pipe)
            _generate(pipe)
        finally:
            view._engines.prompt_stage = real
    assert len(calls) == 2  # one per run (the batch is the engines' batch: one chunk)


def test_budget_one_engines_reproduce_the_dense_pipeline(tmp_path_factory):
    res = _export(tmp_path_factory, 1.0)
    assert [b["key"] for b in res.manifest["buckets"]] == [f"k0256-t{MSL:04d}"]
    pipe = build_tiny_pipeline()
    dense = _generate(pipe)
    with _engines(pipe, res.directory):
        engine = _generate(pipe)
    assert np.abs(engine - dense).max() <= 1e-4


def test_mismatched_size_is_refused(export_half):
    from tokprune.errors import TokpruneError

    pipe = build_tiny_pipeline()
    with _engines(pipe, export_half.directory), pytest.raises(TokpruneError, match="(?i)resolution|size|latent"):
        # without binning the pipeline renders 192x256: not the engines' 256x256
        _generate(pipe, height=192, width=256, use_resolution_binning=False)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the prompt graph's shape checks trace as constants
@pytest.mark.parametrize("keep,keep_text", [(192, None), (64, None), (64, 10)])
def test_text_kv_input_buckets_export_and_chain_with_the_prompt_graph(tmp_path, keep, keep_text):
    """Buckets can carry the per-prompt text K/V as inputs: the prompt-stage graph (once per run) feeds them,
    and the chain prompt graph -> bucket equals PyTorch (dense: equals diffusers' own forward)."""
    import onnxruntime as ort

    from tokprune.export.equivalence import check_equivalence
    from tokprune.export.onnx_export import export_bucket_onnx, finalize_onnx
    from tokprune.export.spec import BucketSpec

    model = build_tiny_transformer()
    g = replace(PixArtGeometry.from_model(model, batch=2, latent_hw=(32, 24), text_tokens=40), text_kv_inputs=True)
    spec = BucketSpec(g, keep, keep_text)
    raw = tmp_path / "raw" / "m.onnx"
    export_bucket_onnx(model, spec, raw)
    onnx.save_model(finalize_onnx(raw, spec), str(tmp_path / "b.onnx"), save_as_external_data=True, location="b.data")
    report = check_equivalence(model, spec, tmp_path / "b.onnx", threads=1)
    assert report["status"] == "passed" and report["worst"] <= 1e-4
    ops = [n.op_type for n in onnx.load(str(tmp_path / "b.onnx"), load_external_data=False).graph.node]
    if keep < g.num_tokens:  # every block's K and V cache write and the prev_noise reuse move whole rows (ScatterND):
        # ONNX Runtime's per-element ScatterElements was 8 % of a pixart-medium K = 288 bucket at 2 threads
        assert ops.count("ScatterND") == 2 * g.num_layers + 1 and "ScatterElements" not in ops, ops
    assert "Gather" in ops, ops  # the K image rows: whole rows, one index each
    assert ("GatherElements" in ops) == (keep_text is not None), ops  # only text pruning's (small) gathers
    assert {n for n, _ in FAMILY.condition_specs(g).items()} <= set(spec.input_names())
    assert "encoder_hidden_states" not in spec.input_names()

    stage = FAMILY.prompt_stage(model, g).eval()
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 40, 32, generator=gen)
    mask = (torch.arange(40)[None] < torch.tensor([[7], [40]])).long()
    with torch.no_grad():
        torch.onnx.export(stage, (ctx, mask), str(tmp_path / "prompt.onnx"), dynamo=False,
                          input_names=["encoder_hidden_states", "encoder_attention_mask"], output_names=stage.output_names())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    text = ort.InferenceSession(str(tmp_path / "prompt.onnx"), so).run(None, {"encoder_hidden_states": ctx.numpy(),
                                                                              "encoder_attention_mask": mask.numpy()})
    text = dict(zip(stage.output_names(), text))
    with torch.no_grad():
        expect = FAMILY.prepare_conditions(model, g, {"encoder_hidden_states": ctx, "encoder_attention_mask": mask})
    assert max(np.abs(text[k] - expect[k].numpy()).max() for k in expect) <= 1e-5

    feed = spec.sample_inputs(1)
    feed.update({k: torch.from_numpy(v) for k, v in text.items()})
    latent, t = feed["latent"], torch.tensor([500.0, 20.0])
    feed["timestep"] = t
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), so)
    noise = session.run(["noise"], {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        ref = FAMILY.pruned_forward(
            model, g, latent=latent, timestep=t, conditions={"encoder_hidden_states": ctx, "encoder_attention_mask": mask},
            img_idx=feed["img_idx"], txt_idx=feed.get("txt_idx"),
            caches={n[len("cache."):]: v for n, v in feed.items() if n.startswith("cache.")} or None,
            prev_noise=feed.get("prev_noise"),
        ).noise
        if keep == g.num_tokens:
            diffusers = model(latent, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            assert np.abs(noise - diffusers.numpy()).max() <= 1e-4
    assert np.abs(noise - ref.numpy()).max() <= 1e-4


@pytest.mark.parametrize("kw", [dict(image_keep=192, record_text=True), dict(image_keep=64, reuse="features")],
                         ids=["dense-probe", "features"])
def test_probe_and_features_buckets_match_pytorch(tmp_path, kw):
    """The dense probe bucket (text_mass output) and a reuse='features' bucket export and match PyTorch."""
    from tokprune.export.equivalence import check_equivalence
    from tokprune.export.onnx_export import export_bucket_onnx, finalize_onnx
    from tokprune.export.spec import BucketSpec

    model = build_tiny_transformer()
    g = PixArtGeometry.from_model(model, batch=2, latent_hw=(32, 24), text_tokens=40)
    spec = BucketSpec(g, **kw)
    raw = tmp_path / "raw" / "m.onnx"
    export_bucket_onnx(model, spec, raw)
    onnx.save_model(finalize_onnx(raw, spec), str(tmp_path / "b.onnx"), save_as_external_data=True, location="b.data")
    report = check_equivalence(model, spec, tmp_path / "b.onnx", threads=1)
    assert report["status"] == "passed" and report["worst"] <= 1e-4
    assert ("text_mass" in report["max_abs"]) == bool(kw.get("record_text"))


def test_engines_refuse_another_architecture(export_half):
    from tokprune.errors import ManifestError
    from tokprune.families.pixart.models import build_pipeline

    other = build_pipeline(build_tiny_transformer(num_layers=3))
    with pytest.raises(ManifestError, match="fingerprint"):
        runtime.attach(other, export_half.directory, backend="onnxruntime")
    assert type(other.transformer).__name__ == "PixArtTransformer2DModel"  # left as it was
