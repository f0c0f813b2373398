"""The PixArt-architecture yardstick: loss, text path, a smoke training run (saves, resumes, packs), loading as
``--model pixart-shapes`` and its clear error when the weights are not unpacked."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from tokprune import yardstick
from tokprune.errors import ModelNotFoundError
from tokprune.yardstick import dataset as ds
from tokprune.yardstick.pack import unpack
from tokprune.yardstick.pixart_model import PIXART_PRESETS, build_pipeline, build_transformer
from tokprune.yardstick.pixart_train import PixArtBatchStream, _Schedule, diffusion_loss
from tokprune.yardstick.train import TrainConfig, run


def test_base_config_is_the_pixart_sigma_block_design_at_shapes_size():
    cfg = PIXART_PRESETS["base"]
    assert cfg.image_tokens == 1024 and cfg.text_tokens == 32
    with torch.device("meta"):
        tr = build_transformer(cfg)
    n = sum(p.numel() for p in tr.parameters())
    assert 8e6 < n < 11e6  # fp16 ~18 MB: the packed pipeline is two 15 MiB parts at most
    assert tr.config.out_channels == 8 and tr.config.norm_type == "ada_norm_single" and len(tr.transformer_blocks) == 8


def test_vb_term_is_zero_at_the_true_posterior_and_leaves_eps_alone():
    from diffusers import DPMSolverMultistepScheduler

    from tokprune.families.pixart.models import SCHEDULER_CONFIG

    sched = _Schedule(DPMSolverMultistepScheduler(**SCHEDULER_CONFIG), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # eps exact; v = -1: the posterior's (clipped) log-variance
    mse, vb = diffusion_loss(exact, noise, t, sched)
    assert mse.item() == 0.0 and abs(vb.item()) < 1e-6
    pred = torch.cat([noise + 0.5, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    mse, vb = diffusion_loss(pred, noise, t, sched)
    assert mse.item() == pytest.approx(0.25) and vb.item() > 0
    vb.backward()
    assert pred.grad[:, :4].abs().max().item() == 0.0 and pred.grad[:, 4:].abs().max().item() > 0  # mean detached


def test_batches_encode_like_the_pipeline():
    pipe = build_pipeline(PIXART_PRESETS["smoke"])
    item = PixArtBatchStream(0, 4, pipe.tokenizer, 32, cfg_dropout=0.0, seed=0).make(0)
    captions = [ds.sample_spec(i).caption for i in range(4)]
    with torch.no_grad():
        mine = pipe.text_encoder(item["ids"], attention_mask=item["mask"])[0]
        ref, ref_mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu",
                                                 max_sequence_length=32, clean_caption=False)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert torch.equal(item["mask"], ref_mask.cpu())
    assert int(item["mask"][0].sum()) == len(captions[0].split()) + 1  # one token a word, then </s>


def test_missing_weights_say_how_to_train_and_unpack(monkeypatch, tmp_path):
    monkeypatch.setattr(yardstick, "PIXART_SHAPES_DIR", tmp_path / "pixart-shapes")
    with pytest.raises(ModelNotFoundError, match=r"--arch pixart.*tokprune\.yardstick\.pack unpack"):
        yardstick.load_pixart_shapes_pipeline()


def test_pixart_shapes_is_a_model_name():
    from tokprune.models import available_models

    assert "pixart-shapes" in available_models()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of 2 transformer steps, then resumed to 3, packed."""
    out = tmp_path_factory.mktemp("pix")
    cfg = {"out": str(out / "run"), "device": "cpu", "smoke": True, "minutes": 5, "eval_n": 2, "ckpt_minutes": 0,
           "arch": "pixart"}
    first = run(TrainConfig(steps=2, **cfg), argv=["--arch", "pixart", "--smoke"])
    second = run(TrainConfig(steps=3, pack_to=str(out / "pack"), **cfg), argv=["--arch", "pixart", "--smoke"])
    return out, first, second


def test_smoke_run_resumes_and_packs_a_complete_model(trained):
    out, first, second = trained
    assert first["transformer"]["steps"] == 2 and second["transformer"]["steps"] == 3
    assert second["arch"] == "pixart" and len(second["transformer"]["loss_curve"]) == 3
    files = sorted(p.name for p in (out / "pack").iterdir())
    assert files == ["model.tar.part-000", "model.tar.sha256"]  # logs and samples travel inside the tar
    with tarfile.open(out / "pack" / "model.tar.part-000") as tar:
        names = set(tar.getnames())
    assert {"model/training.json", "model/samples.png", "model/yardstick.json", "model/vae/config.json"} <= names
    vae_cfg = json.loads((out / "run" / "model" / "vae" / "config.json").read_text())
    assert vae_cfg["shift_factor"] == 0.0  # the PixArt pipeline decodes without a shift


def test_unpacked_model_loads_as_pixart_shapes_and_samples_at_128(trained, monkeypatch, tmp_path):
    out, _, _ = trained
    target = unpack(out / "pack", tmp_path / "pixart-shapes")
    monkeypatch.setattr(yardstick, "PIXART_SHAPES_DIR", target)
    pipe = yardstick.load_pixart_shapes_pipeline()
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    from tokprune.models import call_defaults
    from tokprune.pruning.family import family_for

    defaults = call_defaults(pipe)
    assert defaults["use_resolution_binning"] is False and defaults["max_sequence_length"] == 32
    s = family_for(pipe).settings(pipe)
    assert (s.height, s.width, s.latent_hw, s.text_tokens) == (128, 128, (64, 64), 32)  # not binned up to 512
    kw = {**defaults, "num_inference_steps": 2}
    a = pipe("a small red circle in the center", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    b = pipe("a small red circle in the center", generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
    assert a.shape == (1, 128, 128, 3) and (a == b).all()


def test_quality_comparison_runs_on_pixart_shapes(trained, monkeypatch, tmp_path):
    """``tokprune-quality --model pixart-shapes`` end to end (smoke weights: plumbing only, no accuracy)."""
    from tokprune.yardstick.quality import main

    out, _, _ = trained
    monkeypatch.setattr(yardstick, "PIXART_SHAPES_DIR", unpack(out / "pack", tmp_path / "pixart-shapes"))
    rc = main(["--model", "pixart-shapes", "--n", "1", "--chunk", "1", "--budgets", "0.5", "--methods", "cat",
               "--caches", "none", "--noise-n", "0", "--calib-prompts", "1", "--steps", "4", "--threads", "1",
               "--out", str(tmp_path / "q"), "--quiet"])
    assert rc == 0
    doc = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert doc["settings"]["call"] == {"steps": 4, "guidance": 3.0, "height": 128, "width": 128, "max_sequence_length": 32}
    rows = {r["row"]: r for r in doc["aggregate"]["rows"]}
    assert "cat@0.5" in rows and abs(rows["cat@0.5"]["mac_fraction"] - 0.5) < 0.02


def test_evaluate_cli_reads_a_pixart_directory(trained, capsys):
    from tokprune.yardstick.evaluate import default_max_sequence_length, main

    out, _, _ = trained
    assert main(["--model", str(out / "run" / "model"), "--n", "1", "--steps", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 1 and result["max_sequence_length"] == 32
    pipe = build_pipeline(PIXART_PRESETS["smoke"])
    assert default_max_sequence_length(pipe) == 32  # PixArt's T5 is `tokenizer`, not `tokenizer_3`
