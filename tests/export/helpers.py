"""Helpers shared by the export tests: the tiny export command and an ONNX Runtime sampling loop."""

from __future__ import annotations

import time
from pathlib import Path

import torch

STEPS = 6  # denoising steps of the test exports (calibration cost grows with it)
PROMPT = "a red circle on a blue background"


def run_export(out: Path, *extra: str) -> tuple[int, float]:
    from tokprune.export.cli import main

    start = time.perf_counter()
    rc = main(["--model", "sd3-tiny", "--steps", str(STEPS), "--num-prompts", "2", "--out", str(out), "--quiet", *extra])
    return rc, time.perf_counter() - start


class OrtSampler:
    """Runs a StableDiffusion3Pipeline's transformer calls through an export's ONNX buckets.

    A minimal stand-in for the runtime (``tokprune.runtime``): per step it picks the bucket the
    manifest names, selects tokens with the same policy as the eager sampler, feeds the bucket in
    ONNX Runtime, scatters the fresh rows into its caches and keeps the previous prediction.
    """

    def __init__(self, directory: Path, *, policy: str = "random", seed: int = 0) -> None:
        from tokprune.export.manifest import load_manifest
        from tokprune.export.runners import OnnxRuntimeRunner
        from tokprune.pruning.policies import make_policy

        self.manifest = load_manifest(directory)
        self.specs = self.manifest.bucket_specs()
        self.runners = {k: OnnxRuntimeRunner(self.manifest.onnx_path(k), s).activate() for k, s in self.specs.items()}
        self.steps = self.manifest.step_buckets
        self.policy = make_policy(policy, seed=seed)
        self.calls: list[str | None] = []
        self.scheduler = None

    def install(self, pipe) -> None:
        self.scheduler = pipe.scheduler
        pipe.transformer.__dict__["forward"] = self

    @staticmethod
    def remove(pipe) -> None:
        pipe.transformer.__dict__.pop("forward", None)

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 return_dict=True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        from tokprune.pruning.forward import patchify, scatter_rows
        from tokprune.pruning.policies import select_text_tokens

        step = self.scheduler.step_index or 0
        if step == 0:
            g = next(iter(self.specs.values())).geometry
            self.caches = {n: torch.zeros(s) for n, s in g.cache_specs(self.manifest.reuse).items()}
            self.prev, self.text_importance = None, None
            self.policy.reset(batch=g.batch // 2, grid=g.grid)  # CFG: one selection per prompt
        key = self.steps[step]
        self.calls.append(key)
        if key is None:
            noise = self.prev.clone()
        else:
            spec = self.specs[key]
            g = spec.geometry
            if spec.dense:  # as the eager sampler: all tokens, in order, without asking the policy
                idx = torch.arange(g.num_tokens).expand(g.batch, g.num_tokens)
            else:
                idx = self.policy.select(spec.image_keep)  # (P, K), shared by both CFG halves
                idx = torch.cat([idx, idx])  # (B, K)
            feed = {
                "latent": hidden_states,
                "encoder_hidden_states": encoder_hidden_states,
                "pooled_projections": pooled_projections,
                "timestep": timestep.float(),
                "img_idx": idx,
            }
            if spec.prunes_text:
                feed["txt_idx"] = select_text_tokens(self.text_importance, spec.text_keep)
            if not spec.dense:
                if spec.reuse == "noise":
                    feed["prev_noise"] = self.prev
                for t in spec.inputs():
                    if t.cache is not None:
                        feed[t.name] = self.caches[t.cache]
            out = self.runners[key].infer(feed)
            for t in spec.outputs():
                if t.cache is not None:
                    scatter_rows(self.caches[t.cache], idx, out[t.name], inplace=True)
            if "text_mass" in out:
                self.text_importance = out["text_mass"]
            noise = out["noise"]
            u, c = patchify(noise, g.patch).float().chunk(2)  # the guided prediction, as the sampler scores
            guided = u + float(self.manifest.data["guidance"]) * (c - u)
            self.policy.observe(guided, dense=spec.dense and not spec.prunes_text,
                                selected=None if spec.dense else idx[: g.batch // 2])
        self.prev = noise
        return Transformer2DModelOutput(sample=noise) if return_dict else (noise,)
