"""The yardstick pipeline: tokenizers, text encoding, a smoke training run that saves, resumes, loads and generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokprune.yardstick import dataset as ds
from tokprune.yardstick.evaluate import evaluate, generate
from tokprune.yardstick.model import (
    PRESETS,
    build_pipeline,
    build_tokenizers,
    load_meta,
    load_pipeline,
)
from tokprune.yardstick.pack import pack, unpack
from tokprune.yardstick.train import TrainConfig, run
from tokprune.yardstick.train_data import BatchStream as _BatchStream
from tokprune.yardstick.train_data import batches as _batches
from tokprune.yardstick.train_data import encode_text


def test_every_word_is_one_token_and_captions_fit():
    clip, t5 = build_tokenizers(32)
    ids = set()
    for word in ds.vocabulary():
        c, t = clip(word).input_ids, t5(word).input_ids
        assert len(c) == 3 and len(t) == 2
        ids.add((c[1], t[0]))
    assert len(ids) == len(ds.vocabulary())  # injective
    longest = max((ds.sample_spec(i).caption for i in range(300)), key=len)
    assert len(t5(longest).input_ids) <= 32 and len(clip(longest).input_ids) <= 77


def test_base_model_sizes():
    cfg = PRESETS["base"]
    assert cfg.image_tokens == 1024 and cfg.text_tokens == 77 + 32 and cfg.latent_size == 64
    from tokprune.yardstick.model import build_transformer

    with torch.device("meta"):
        n = sum(p.numel() for p in build_transformer(cfg).parameters())
    assert 15e6 < n < 22e6  # fp16 weights ~37 MB: the whole pipeline stays under 50 MB


def test_encode_text_matches_the_pipeline():
    pipe = build_pipeline(PRESETS["smoke"])
    stream = _BatchStream(0, 4, tokenizers=(pipe.tokenizer, pipe.tokenizer_3), max_sequence_length=32)
    item = stream.make(0)
    captions = [s.caption for s in (ds.sample_spec(i) for i in range(4))]
    with torch.no_grad():
        mine, mine_pooled = encode_text(pipe, item["clip_ids"], item["t5_ids"])
        ref, _, ref_pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=32)
    assert mine.shape == (4, 77 + 32, 32)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    torch.testing.assert_close(mine_pooled, ref_pooled, rtol=0, atol=0)


def test_cfg_dropout_is_deterministic_per_step():
    clip, t5 = build_tokenizers(32)
    stream = _BatchStream(0, 64, tokenizers=(clip, t5), cfg_dropout=0.25, seed=1)
    a, b = stream.make(3), stream.make(3)
    assert torch.equal(a["clip_ids"], b["clip_ids"]) and torch.equal(a["params"], b["params"])
    empty = clip("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    dropped = (a["clip_ids"] == empty).all(-1).float().mean().item()
    assert 0.05 < dropped < 0.5


def test_worker_processes_keep_the_step_order():
    clip, t5 = build_tokenizers(32)
    stream = _BatchStream(5, 3, tokenizers=(clip, t5), cfg_dropout=0.5, seed=2)
    batches = _batches(stream, workers=2)
    got = [next(batches) for _ in range(4)]
    del batches
    for k, item in enumerate(got):
        want = stream.make(5 + k)
        assert torch.equal(item["params"], want["params"]) and torch.equal(item["t5_ids"], want["t5_ids"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of 2 transformer steps, then resumed to 3."""
    out = tmp_path_factory.mktemp("yardstick_run")
    cfg = {"out": str(out), "device": "cpu", "smoke": True, "minutes": 5, "vae_steps": 2, "eval_n": 2, "ckpt_minutes": 0}
    first = run(TrainConfig(steps=2, **cfg), argv=["--smoke"])
    second = run(TrainConfig(steps=3, **cfg), argv=["--smoke", "--steps", "3"])
    return out, first, second


def test_smoke_run_writes_a_complete_model(trained):
    out, first, second = trained
    assert first["transformer"]["steps"] == 2 and second["transformer"]["steps"] == 3  # resumed, not restarted
    assert second["vae"]["steps"] == 2
    report = json.loads((out / "training.json").read_text())
    for key in ("command", "versions", "device", "parameters", "tokens", "vae", "transformer", "eval", "chosen"):
        assert key in report
    assert report["tokens"] == {"image": 1024, "text": 109, "latent": [4, 64, 64], "image_px": 128}
    assert [h[0] for h in report["transformer"]["loss_curve"]] == [1, 2, 3]
    model = out / "model"
    assert (model / "model_index.json").is_file() and (model / "yardstick.json").is_file()
    assert load_meta(model).max_sequence_length == 32
    assert (out / "samples.png").is_file() and (out / "checkpoint.pt").is_file()
    assert not list(out.glob("*.tmp"))


def test_saved_pipeline_loads_offline_and_generates_deterministically(trained):
    from diffusers import StableDiffusion3Pipeline

    out, _, _ = trained
    plain = StableDiffusion3Pipeline.from_pretrained(str(out / "model"), local_files_only=True)
    assert plain.transformer.dtype == torch.float32  # stored fp16, loads fp32
    assert plain.transformer.config.patch_size == 2 and plain.vae.config.scaling_factor != 1.0
    pipe, meta = load_pipeline(out / "model")
    captions = [ds.sample_spec(i, ds.EVAL_SEED).caption for i in range(2)]
    a = generate(pipe, captions, steps=2, guidance=3.0, seed=5)
    b = generate(pipe, captions, steps=2, guidance=3.0, seed=5)
    c = generate(pipe, captions, steps=2, guidance=3.0, seed=6)
    assert a.shape == (2, 128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    result = evaluate(pipe, n=2, steps=2, guidance=meta.guidance_scale)
    assert result["n_images"] == 2 and 0.0 <= result["mean"] <= 1.0 and result["max_sequence_length"] == 32


def test_pack_round_trip(trained, tmp_path):
    out, _, _ = trained
    parts = pack(out / "model", tmp_path / "parts", part_mib=0.2)
    assert len(parts) >= 2 and all(p.stat().st_size <= 0.2 * 2**20 for p in parts)
    dest = unpack(tmp_path / "parts", tmp_path / "restored")
    for f in (out / "model").rglob("*"):
        if f.is_file():
            assert (dest / f.relative_to(out / "model")).read_bytes() == f.read_bytes()
