"""Loop scenarios' harness: a bare transformer in a flow-matching Euler loop, dense or through the runtime.

:class:`Loop` builds a random-weight transformer of a :class:`~tokprune.bench.scenario.LoopScenario`,
its geometry and seeded inputs, and gives the loops every scenario times: diffusers' own forward
(:meth:`Loop.diffusers`), and the runtime's step loop (the sampler with the runtime's
:class:`~tokprune.runtime.engine.EngineExecutor`) over hand-made bucket runners (:meth:`Loop.pruned`).
Timing is :mod:`tokprune.bench.harness`'s; per-bucket MAC predictions use :mod:`tokprune.pruning.macs`.

Example::

    from tokprune.bench.loop import Loop
    from tokprune.bench.scenario import LoopScenario
    loop = Loop(LoopScenario.tiny())
    seconds, peak_bytes = loop.timed(loop.diffusers(loop.model))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokprune.bench.harness import PeakMemory, device_sync, time_repeats
from tokprune.bench.scenario import LoopScenario
from tokprune.pruning.sampler import TokenPruner

__all__ = ["DTYPES", "Loop", "PooledPruner"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PooledPruner(TokenPruner):
    """The sampler with its caches allocated once (CUDA graphs bind cache addresses: they must not move)."""

    _pool: dict[str, torch.Tensor] | None = None

    def allocate_caches(self, geometry: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self._pool is None:
            self._pool = super().allocate_caches(geometry, device, dtype)
        return self._pool


class Loop:
    """One scenario's model, geometry, inputs and timing helpers."""

    def __init__(self, sc: LoopScenario) -> None:
        from tokprune.bench.models import build_transformer
        from tokprune.pruning.geometry import Geometry

        self.sc = sc
        self.device = torch.device(sc.device if sc.device != "cuda" or torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[sc.dtype]
        self.model = build_transformer(sc.arch, device=self.device, dtype=self.dtype)
        s = int(self.model.config.sample_size)
        text = sc.text_tokens if sc.text_tokens is not None else 77 + 256
        self.g = Geometry.from_model(self.model, batch=sc.batch, latent_hw=(s, s), text_tokens=text)
        self.sync = device_sync(self.device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        c = self.model.config
        self.inp = {k: v.to(self.device, self.dtype) for k, v in (
            ("latent", torch.randn(sc.batch, self.g.in_channels, s, s, generator=gen)),
            ("ehs", torch.randn(sc.batch, text, int(c.joint_attention_dim), generator=gen)),
            ("pooled", torch.randn(sc.batch, int(c.pooled_projection_dim), generator=gen)))}

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int]:
        """(median seconds, peak bytes of one extra run) of ``fn`` under the scenario's warm-up and repeats."""
        import statistics

        secs = statistics.median(time_repeats(fn, sync=self.sync, warmup=self.sc.warmup, repeats=self.sc.repeats))
        mem = PeakMemory(self.device)
        mem.start()
        fn()
        return secs, mem.stop()

    def euler(self, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A flow-matching Euler loop ``x += dt * call(x, t)`` over the scenario's steps; returns the final latent."""
        steps = self.sc.steps
        x = self.inp["latent"].clone()
        ts = torch.linspace(1000.0, 1000.0 / steps, steps)
        for s in range(steps):
            x = x + (-1.0 / steps) * call(x, torch.full((x.shape[0],), float(ts[s]), device=self.device))
        return x

    def step_call(self, model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One diffusers transformer call on the scenario's conditions."""
        inp = self.inp
        return lambda x, t: model(hidden_states=x, encoder_hidden_states=inp["ehs"], pooled_projections=inp["pooled"],
                                  timestep=t, return_dict=False)[0]

    def diffusers(self, model: Any) -> Callable[[], torch.Tensor]:
        call = self.step_call(model)
        return lambda: self.euler(call)

    def pruned(self, plan: Any, runners: dict[str, Any]) -> Callable[[], torch.Tensor]:
        """The runtime's own step loop (TokenPruner + the runtime's EngineExecutor) over ``runners``."""
        from tokprune.pruning.family import family_for
        from tokprune.runtime.engine import EngineExecutor

        pruner = PooledPruner(torch.nn.Identity(), plan, policy="cat", reuse="noise", executor=EngineExecutor.over(runners),
                              config=self.model.config, family=family_for(self.model),
                              guidance=7.0 if self.sc.batch == 2 else None)
        inp = self.inp

        def run() -> torch.Tensor:
            pruner.reset()
            return self.euler(lambda x, t: pruner(x, inp["ehs"], inp["pooled"], t, return_dict=False)[0])
        return run

    def bucket_rows(self, mode: str, specs: Sequence[Any], runners: dict[str, Any]) -> list[dict[str, Any]]:
        """Each bucket alone (fixed feed): latency vs the dense bucket's latency x its MAC ratio."""
        from tokprune.pruning.macs import dense_macs, step_macs

        rows, dense_s = [], None
        for spec in specs:  # dense first
            feed = {n: x.to(self.device) for n, x in spec.sample_inputs(0).items()}
            secs, _ = self.timed(lambda: runners[spec.key].infer(feed))
            ratio = step_macs(self.g, spec.image_keep) / dense_macs(self.g)
            dense_s = secs if dense_s is None else dense_s
            rows.append({"mode": mode, "bucket": spec.key, "mac_ratio": round(ratio, 4), "ms": round(secs * 1e3, 3),
                         "predicted_ms": round(dense_s * ratio * 1e3, 3), "vs_prediction": round(secs / (dense_s * ratio) - 1, 4)})
        return rows
