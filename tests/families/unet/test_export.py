"""Static-shape U-Net buckets export to ONNX and run in ONNX Runtime like PyTorch (<= 1e-4).

Buckets of one call geometry: a dense full step (writes the DeepCache feature), a DaTo + text-pruned
full step, and a DaTo-pruned cached step (reads the feature). The traced body is the family's pure
pruned forward (``inplace=False``), exactly what the generic exporter traces.
"""

from __future__ import annotations

import pytest
import torch

from tests.families.unet.helpers import make_call, make_unet, random_keep
from tokprune.families.unet import FAMILY

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency; install the test extra")


class _Bucket(torch.nn.Module):
    def __init__(self, unet, g, names, cached, prunes):
        super().__init__()
        self.unet, self.g, self.names, self.cached, self.prunes = unet, g, names, cached, prunes

    def forward(self, *xs):
        feed = dict(zip(self.names, xs))
        cond = {k: feed[k] for k in FAMILY.condition_specs(self.g)}
        out = FAMILY.pruned_forward(
            self.unet, self.g, latent=feed["latent"], timestep=feed["timestep"], conditions=cond,
            img_idx=feed["img_idx"], txt_idx=feed.get("txt_idx"),
            caches={"deep": feed["cache.deep"]} if self.cached else None, cached=self.cached,
        )  # fmt: skip
        return (out.noise,) if self.cached else (out.noise, out.fresh["deep"])


@pytest.mark.parametrize("variant", ["sd15-tiny", "sdxl-tiny"])
def test_buckets_match_pytorch_in_onnxruntime(variant, tmp_path):
    unet = make_unet(variant)
    g, ours, _ = make_call(unet, 2, (16, 24))
    base = {"latent": ours["sample"], "timestep": ours["timestep"], "encoder_hidden_states": ours["encoder_hidden_states"]}
    if g.pooled_dim:
        base.update(text_embeds=ours["text_embeds"], time_ids=ours["time_ids"])
    with torch.no_grad():
        deep = FAMILY.pruned_forward(unet, g, latent=base["latent"], timestep=base["timestep"],
                                     conditions={k: v for k, v in base.items() if k not in ("latent", "timestep")},
                                     img_idx=torch.arange(g.num_tokens).expand(2, -1)).fresh["deep"]  # fmt: skip
    k = g.num_tokens // 2
    buckets = {
        "dense": ({"img_idx": torch.arange(g.num_tokens).expand(2, -1).contiguous()}, False),
        "pruned": ({"img_idx": random_keep(g, k), "txt_idx": torch.tensor([[0, 1, 2, 3, 9, 20]] * 2)}, False),
        "cached": ({"img_idx": random_keep(g, k, seed=1), "cache.deep": deep}, True),
    }
    for name, (extra, cached) in buckets.items():
        feed = {**base, **extra}
        module = _Bucket(unet, g, list(feed), cached, name != "dense").eval()
        path = tmp_path / f"{name}.onnx"
        with torch.no_grad():
            want = module(*feed.values())
            torch.onnx.export(module, tuple(feed.values()), str(path), dynamo=True, input_names=list(feed),
                              output_names=[f"o{i}" for i in range(len(want))], verbose=False)  # fmt: skip
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted_inputs = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {n: x.numpy() for n, x in feed.items() if n in wanted_inputs})
        for w, o in zip(want, got):
            assert (torch.from_numpy(o) - w).abs().max().item() <= 1e-4, name


def test_ort_runner_reproduces_the_eager_pruned_run(tmp_path):
    """The DaTo + DeepCache plan run through exported buckets equals the eager run (final latent <= 1e-4)."""
    from tokprune.families.unet import apply, get_pruner, remove
    from tokprune.families.unet.export import BucketKey, OrtRunner, export_bucket
    from tokprune.families.unet.geometry import UNetGeometry
    from tokprune.families.unet.models import build_pipeline
    from tokprune.pruning.plan import ALL, PrunePlan

    pipe = build_pipeline("sd15-tiny")
    g = UNetGeometry.from_config(pipe.unet.config, batch=2, latent_hw=(16, 16), text_tokens=77)
    n, k = g.num_tokens, g.num_tokens // 2
    plan = PrunePlan((ALL, ALL, k, k, k), step_cache=(False, False, True, False, True))
    keys = [BucketKey(n), BucketKey(k), BucketKey(k, cached=True)]
    for key in keys:
        assert export_bucket(pipe.unet, g, key, tmp_path / f"{key.name}.onnx") <= 1e-4
    runner = OrtRunner({key: tmp_path / f"{key.name}.onnx" for key in keys}, threads=1)
    call = dict(prompt="a red circle", num_inference_steps=5, guidance_scale=5.0, output_type="latent", height=32, width=32)
    apply(pipe, plan)
    eager = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    get_pruner(pipe).executor = runner
    ort_out = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    remove(pipe)
    assert (ort_out - eager).abs().max().item() <= 1e-4
    apply(pipe, PrunePlan.dense(5))
    get_pruner(pipe).executor = runner  # budget-1.0: the dense bucket every step reproduces the dense run
    dense_ort = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    remove(pipe)
    dense = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert (dense_ort - dense).abs().max().item() <= 1e-4
