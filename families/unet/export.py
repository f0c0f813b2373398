"""Static-shape U-Net buckets as ONNX graphs, and an ONNX Runtime executor for the generic sampler.

A bucket is one (K, K_txt, step kind) of one call geometry. Its graph is the family's pure pruned
forward: inputs ``latent``, ``timestep`` (float32), the family's conditions, ``img_idx`` (pruned buckets),
``txt_idx`` (text-pruned buckets), ``cache.deep`` (cached buckets); outputs ``noise`` and, for full
steps, ``fresh.deep`` (the whole DeepCache feature: copied into the run's cache, never scattered).

A family-side exporter kept for ``results/unet/bench_ort.py``; the user flow is the generic one
(``tokprune-export --model sd15-tiny --budget 0.5``: ``tokprune.export`` with ``-cached`` buckets, then
``tokprune.runtime``), which this module does not take part in.

Example::

    from tokprune.families.unet.export import BucketKey, export_bucket, OrtRunner
    key = BucketKey(keep=1024, keep_text=None, cached=True)
    export_bucket(pipe.unet, geometry, key, "bucket.onnx")
    runner = OrtRunner({key: "bucket.onnx"})
    pruner.executor = runner      # the pruning hook now runs its steps in ONNX Runtime
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from tokprune.errors import ConfigError, ShapeError
from tokprune.families.unet.forward import unet_forward
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.pruning.forward import StepOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketKey:
    """``keep``: image tokens of the pruned level (N = dense); ``keep_text``: None = all; ``cached``: DeepCache step."""

    keep: int
    keep_text: int | None = None
    cached: bool = False

    @property
    def name(self) -> str:
        return f"k{self.keep}-t{self.keep_text or 'all'}-{'cached' if self.cached else 'full'}"


def bucket_inputs(g: UNetGeometry, key: BucketKey) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Input names -> (shape, dtype) of a bucket, in graph order."""
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "latent": ((g.batch, g.in_channels, *g.latent_hw), torch.float32),
        "timestep": ((g.batch,), torch.float32),
    }
    for name, (shape, _) in g.condition_specs().items():
        spec[name] = (tuple(shape), torch.float32)
    if key.keep < g.num_tokens:
        spec["img_idx"] = ((g.batch, key.keep), torch.int64)
    if key.keep_text is not None:
        spec["txt_idx"] = ((g.batch, key.keep_text), torch.int64)
    if key.cached:
        spec["cache.deep"] = (g.deep_shape, torch.float32)
    return spec


class BucketModule(torch.nn.Module):
    """``forward(*inputs) -> (noise[, fresh.deep])`` of one bucket."""

    def __init__(self, unet: torch.nn.Module, g: UNetGeometry, key: BucketKey) -> None:
        super().__init__()
        self.unet, self.g, self.key = unet, g, key
        self.names = list(bucket_inputs(g, key))

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = dict(zip(self.names, xs))
        out = unet_forward(
            self.unet, self.g, sample=feed["latent"], timestep=feed["timestep"],
            encoder_hidden_states=feed["encoder_hidden_states"], text_embeds=feed.get("text_embeds"),
            time_ids=feed.get("time_ids"), img_idx=feed.get("img_idx"), txt_idx=feed.get("txt_idx"),
            caches={"deep": feed["cache.deep"]} if self.key.cached else None,
            step_kind="cached" if self.key.cached else "full",
        )  # fmt: skip
        return (out.noise,) if self.key.cached else (out.noise, out.fresh["deep"])


def sample_inputs(g: UNetGeometry, key: BucketKey, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in bucket_inputs(g, key).items():
        if name == "img_idx":
            out[name] = torch.stack([torch.randperm(g.num_tokens, generator=gen)[: key.keep].sort().values for _ in range(g.batch)])
        elif name == "txt_idx":
            out[name] = torch.arange(key.keep_text).expand(g.batch, -1).contiguous()
        elif name == "timestep":
            out[name] = torch.rand(shape, generator=gen) * 1000
        else:
            out[name] = torch.randn(shape, generator=gen, dtype=dtype)
    return out


def export_bucket(unet: torch.nn.Module, g: UNetGeometry, key: BucketKey, path: str | Path, *, check: bool = True,
                  atol: float = 1e-4) -> float:  # fmt: skip
    """Export one bucket with ``torch.onnx.export(dynamo=True)``; with ``check``, run it in ONNX Runtime on
    sample inputs and raise :class:`ShapeError` when it differs from PyTorch by more than ``atol``.
    Returns the max abs difference (0.0 without ``check``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = BucketModule(unet, g, key).eval()
    feed = sample_inputs(g, key)
    outputs = ["noise"] if key.cached else ["noise", "fresh.deep"]
    with torch.no_grad():
        want = module(*feed.values())
        torch.onnx.export(module, tuple(feed.values()), str(path), dynamo=True, input_names=list(feed),
                          output_names=outputs, verbose=False)  # fmt: skip
    if not check:
        return 0.0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(None, {n: x.numpy() for n, x in feed.items() if n in names})
    err = max(float((torch.from_numpy(o) - w).abs().max()) for o, w in zip(got, want))
    if err > atol:
        raise ShapeError(f"bucket {key.name}: ONNX Runtime differs from PyTorch by {err:.3g} (expected <= {atol:g})")
    return err


class OrtRunner:
    """An executor (``TokenPruner.executor``) that runs exported U-Net buckets in ONNX Runtime.

    Every step must have its bucket (``KeyError`` otherwise names the missing bucket). Full buckets copy
    ``fresh.deep`` into the run's ``caches['deep']`` (the eager contract).
    """

    def __init__(self, buckets: Mapping[BucketKey, str | Path], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in buckets.items()}
        self.inputs = {k: {i.name for i in s.get_inputs()} for k, s in self.sessions.items()}

    def __call__(self, pruner: Any, st: Any, inputs: Any) -> StepOutput:
        """The sampler's executor contract (:func:`tokprune.pruning.sampler.eager_executor`): run the step's
        bucket, copy ``fresh.deep`` into the run's cache, return the step's output."""
        g: UNetGeometry = st.geometry
        if inputs.record_text:
            raise ConfigError("the ONNX Runtime runner has no text-importance probe bucket; run probe steps eagerly")
        img_idx = inputs.img_idx if inputs.img_idx.shape[1] < g.num_tokens else None
        keep = g.num_tokens if img_idx is None else img_idx.shape[1]
        key = BucketKey(keep, None if inputs.txt_idx is None else inputs.txt_idx.shape[1], bool(inputs.cached))
        if key not in self.sessions:
            raise KeyError(f"no exported bucket {key.name}; have {[k.name for k in self.sessions]}")
        caches = st.caches
        feed = {"latent": inputs.latent, "timestep": inputs.timestep.float().expand(g.batch), **inputs.conditions,
                "img_idx": img_idx, "txt_idx": inputs.txt_idx,
                "cache.deep": None if caches is None else caches.get("deep")}  # fmt: skip
        names = self.inputs[key]
        out = self.sessions[key].run(None, {n: x.detach().contiguous().numpy() for n, x in feed.items() if n in names})
        noise = torch.from_numpy(out[0])
        fresh = {}
        if not key.cached:
            fresh["deep"] = torch.from_numpy(out[1])
            if caches is not None and "deep" in caches:
                caches["deep"].copy_(fresh["deep"])
        return StepOutput(noise=noise, fresh=fresh)
