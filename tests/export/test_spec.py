"""BucketSpec: the one source of a bucket's tensor names, shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
from tokprune.calibrate.schedule import Bucket
from tokprune.export.spec import BucketSpec, Precision, TensorSpec, bucket_key
from tokprune.pruning.geometry import Geometry

from tokprune.errors import ConfigError, ShapeError


def geometry(**changes) -> Geometry:
    base = dict(batch=2, latent_hw=(32, 32), text_tokens=333, patch=2, in_channels=16, out_channels=16, num_layers=2,
                heads=4, head_dim=8, joint_attention_dim=32, pooled_dim=64)
    base.update(changes)
    return Geometry(**base)


def table(spec: BucketSpec) -> dict[str, tuple]:
    return {t.name: (t.role, t.shape, t.dtype) for t in spec.io()}


def test_dense_bucket_takes_no_caches_and_outputs_fresh_rows():
    spec = BucketSpec(geometry(), 256)
    assert spec.dense and spec.key == "k0256-t0333"
    assert table(spec) == {
        "latent": ("input", (2, 16, 32, 32), "float32"),
        "encoder_hidden_states": ("input", (2, 333, 32), "float32"),
        "pooled_projections": ("input", (2, 64), "float32"),
        "timestep": ("input", (2,), "float32"),
        "img_idx": ("input", (2, 256), "int64"),
        "noise": ("output", (2, 16, 32, 32), "float32"),
        "fresh.blocks.0.k": ("output", (2, 4, 256, 8), "float32"),
        "fresh.blocks.0.v": ("output", (2, 4, 256, 8), "float32"),
        "fresh.blocks.1.k": ("output", (2, 4, 256, 8), "float32"),
        "fresh.blocks.1.v": ("output", (2, 4, 256, 8), "float32"),
    }


def test_pruned_bucket_reads_caches_and_prev_noise_in_order():
    g = geometry()
    spec = BucketSpec(g, 64, 100, precision="fp16")
    names = spec.input_names()
    assert names == ["latent", "encoder_hidden_states", "pooled_projections", "timestep", "img_idx", "txt_idx",
                     "prev_noise", "cache.blocks.0.k", "cache.blocks.0.v", "cache.blocks.1.k", "cache.blocks.1.v"]
    t = table(spec)
    assert t["txt_idx"] == ("input", (2, 100), "int64")
    assert t["cache.blocks.1.v"] == ("input", (2, 4, 256, 8), "float16")  # caches hold all N tokens
    assert t["fresh.blocks.1.v"] == ("output", (2, 4, 64, 8), "float16")  # fresh rows: K tokens
    assert t["timestep"][2] == "float32"  # sinusoids are computed in fp32 whatever the precision
    # cache names map back to Geometry.cache_specs keys, shapes from the geometry itself
    caches = {x.cache: x.shape for x in spec.inputs() if x.cache}
    assert caches == g.cache_specs("noise")
    fresh = {x.cache: x.shape for x in spec.outputs() if x.cache}
    assert fresh == g.fresh_specs(64, "noise")


def test_features_reuse_and_dual_attention_add_their_caches():
    g = geometry(dual_attention_layers=(0,), qk_norm="rms_norm")
    spec = BucketSpec(g, 128, reuse="features")
    names = spec.input_names()
    assert "prev_noise" not in names  # features mode rebuilds every token instead
    assert {"cache.blocks.0.k2", "cache.blocks.0.attn2", "cache.blocks.1.ff"} <= set(names)
    assert len([t for t in spec.inputs() if t.cache]) == len(g.cache_specs("features"))


def test_record_text_adds_text_mass_only_on_the_dense_full_text_bucket():
    g = geometry()
    assert table(BucketSpec(g, 256, record_text=True))["text_mass"] == ("output", (2, 333), "float32")
    with pytest.raises(ConfigError):
        BucketSpec(g, 64, record_text=True)


def test_probe_variant_has_its_own_key_and_one_more_output():
    g = geometry()
    plain, probe = BucketSpec(g, 256), BucketSpec(g, 256, record_text=True)
    assert plain.key == "k0256-t0333" and probe.key == "k0256-t0333-probe" == bucket_key(256, 333, probe=True)
    assert probe.input_names() == plain.input_names()
    assert probe.output_names() == plain.output_names() + ["text_mass"]
    assert probe.to_dict()["key"] == probe.key and probe.to_dict()["record_text"]
    assert BucketSpec.from_dict(probe.to_dict(), g) == probe


def test_key_matches_the_schedule_bucket_key():
    g = geometry()
    for k, t in ((256, 333), (48, 333), (256, 77), (1, 1)):
        assert BucketSpec(g, k, t).key == Bucket(k, t).key


@pytest.mark.parametrize("kwargs", [dict(image_keep=0), dict(image_keep=257), dict(image_keep=8, text_keep=334)])
def test_out_of_range_keep_counts_are_refused(kwargs):
    with pytest.raises(ShapeError):
        BucketSpec(geometry(), **kwargs)


def test_sample_inputs_are_valid_and_seeded():
    spec = BucketSpec(geometry(batch=1), 100, 50, precision=Precision.FP16)
    a, b, c = spec.sample_inputs(0), spec.sample_inputs(0), spec.sample_inputs(1)
    assert list(a) == spec.input_names()
    spec.check_feed(a)
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["img_idx"], c["img_idx"])
    assert a["img_idx"].unique().numel() == 100 and int(a["img_idx"].max()) < 256
    assert a["txt_idx"].unique().numel() == 50 and bool((a["txt_idx"].diff() > 0).all())
    assert a["latent"].dtype == torch.float16 and a["timestep"].dtype == torch.float32
    dense = BucketSpec(geometry(batch=1), 256).sample_inputs(0)["img_idx"]
    assert sorted(dense[0].tolist()) == list(range(256))  # a permutation of all tokens


def test_check_feed_names_every_problem():
    spec = BucketSpec(geometry(), 64)
    feed = spec.sample_inputs(0)
    feed.pop("prev_noise")
    feed["img_idx"] = feed["img_idx"].int()
    feed["extra"] = torch.zeros(1)
    with pytest.raises(ShapeError) as err:
        spec.check_feed(feed)
    msg = str(err.value)
    assert "prev_noise: missing, expected shape (2, 16, 32, 32) float32" in msg and "extra: unexpected input" in msg
    assert "img_idx: got shape (2, 64) int32 on cpu, expected shape (2, 64) int64" in msg


def test_io_round_trips_through_dicts_and_sizes_buffers():
    g = geometry()
    spec = BucketSpec(g, 64, 100, precision="bf16")
    assert BucketSpec.from_dict(spec.to_dict(), g) == spec
    assert [TensorSpec.from_dict(t.to_dict()) for t in spec.io()] == spec.io()
    cache = next(t for t in spec.inputs() if t.cache)
    assert cache.nbytes == 2 * 4 * 256 * 8 * 2 and cache.empty().dtype == torch.bfloat16


def test_precision_and_backend_parse_with_helpful_errors():
    from tokprune.export.spec import Backend

    assert Precision.parse("FP16") is Precision.FP16 and Backend.parse("onnx") is Backend.ONNX
    with pytest.raises(ConfigError, match="--precision fp32"):
        Precision.parse("int8")
    with pytest.raises(ConfigError, match="--backend"):
        Backend.parse("tvm")
