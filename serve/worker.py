"""One replica's generator: the export's engines as the transformer of a diffusers pipeline.

:class:`ImageGenerator` loads the engines once (:func:`tokprune.runtime.load`, which verifies the
directory) and the rest of the pipeline (text encoders, VAE) once, then keeps a pool of *slots*:
pipelines that share those modules read-only but each own a scheduler, tokenizers (fast
tokenizers keep per-call padding state, so threads must not share one) and a runtime view
(:func:`tokprune.runtime.attach` gives each pipeline its own view with its own pruning caches).
A request takes a slot for its whole run, so concurrent requests never share caches or selection
state. A failed run drops its slot and builds a fresh one: a failure never poisons the replica.

Requests with the same guidance (and size / steps) are batched into one pipeline call with one
seeded ``torch.Generator`` per image; diffusers draws each image's initial latents from its own
generator, and the runtime runs the batch in chunks of the engines' batch.

Example::

    gen = ImageGenerator("engines/shapes-128x128-s8-b0.5")
    req = parse_request({"prompt": "a red circle", "seed": 0}, gen.limits)
    (result,) = gen.generate_batch([req])
    open("circle.png", "wb").write(result.png)
"""

from __future__ import annotations

import copy
import io
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprune.errors import TokpruneError
from tokprune.serve.request import GenerateRequest, Limits

logger = logging.getLogger(__name__)

__all__ = ["GenerateResult", "ImageGenerator", "ThreadBackend", "clone_pipeline"]


@dataclass
class GenerateResult:
    """One image and where its time went (milliseconds)."""

    png: bytes
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    batch: int = 1
    pid: int = field(default_factory=os.getpid)
    retries: int = 0  # set by the Ray ingress when the first replica died under the request

    def to_json(self) -> dict[str, Any]:
        import base64

        return {"image_png_base64": base64.b64encode(self.png).decode("ascii"), "seed": self.seed,
                "timings_ms": self.timings, "batch": self.batch, "pid": self.pid, "retries": self.retries}


def clone_pipeline(pipe: Any) -> Any:
    """A pipeline sharing ``pipe``'s modules with its own scheduler and tokenizers (one per concurrent run)."""
    parts = dict(pipe.components)
    for name in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
        if parts.get(name) is not None:
            parts[name] = copy.deepcopy(parts[name])
    clone = type(pipe)(**parts)
    clone.set_progress_bar_config(disable=True)
    return clone


class ImageGenerator:
    """Loads an export once and generates images for validated requests, ``slots`` at a time.

    Args that matter: ``engine_dir``; ``slots`` (concurrent pipeline runs in this process).
    Args to tinker with: ``backend`` / ``device`` / ``threads`` (passed to :func:`tokprune.runtime.load`),
    ``max_prompt_chars``, ``engines`` (a runtime already loaded from ``engine_dir``: used instead of loading).
    """

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        slots: int = 1,
        backend: str = "onnxruntime",
        device: str | None = None,
        threads: int | None = None,
        max_prompt_chars: int = 2000,
        engines: Any = None,
    ) -> None:
        import torch

        from tokprune import runtime
        from tokprune.runtime.cli import load_components

        t0 = time.perf_counter()
        self.directory = Path(engine_dir)
        # engines: an already loaded runtime (e.g. the Triton BLS model's, whose runners call Triton models)
        self._rt = engines if engines is not None else runtime.load(self.directory, backend=backend, device=device,
                                                                     threads=threads)
        self.manifest = self._rt.manifest
        self.limits = Limits.from_manifest(self.manifest, max_prompt_chars=max_prompt_chars)
        self._base = load_components(self.manifest, device=self._rt.device, dtype=self._rt.dtype, with_transformer=False)
        self._base.set_progress_bar_config(disable=True)
        g = self.manifest.geometry
        self._call_kwargs = self._rt.family.call_kwargs(self._base, g)  # the text length the engines take
        self._torch = torch
        self._slots: queue.Queue[Any] = queue.Queue()
        for _ in range(max(1, int(slots))):
            self._slots.put(self._new_slot())
        self.slots = max(1, int(slots))
        self.served = 0
        self.failed = 0
        self._closed = False
        self._count_lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded %s (%d slots) in %.1f s", self.directory, self.slots, self.load_seconds)

    def _new_slot(self) -> Any:
        from tokprune import runtime

        pipe = clone_pipeline(self._base)
        runtime.attach(pipe, self._rt)  # a new view (own caches and state) on the shared engines
        return pipe

    # ---- health --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if this generator cannot serve (it was closed)."""
        if self._closed:
            raise TokpruneError(f"the generator of {self.directory} was closed; restart the replica")

    def close(self) -> None:
        """Release the engines (every slot stops working)."""
        self._closed = True
        self._rt.close()

    def describe(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "pid": os.getpid(), "slots": self.slots, "served": self.served,
                "failed": self.failed, "limits": self.limits.describe(), "backend": self._rt.backend.value,
                "buckets": sorted(self._rt.runners)}

    # ---- generation ------------------------------------------------------------------------------
    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult | BaseException]:
        """One result (or the exception that failed it) per request, in order.

        Requests that share :meth:`GenerateRequest.batch_key` run as one pipeline call; a failing
        group fails only its own requests.
        """
        out: list[GenerateResult | BaseException | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.batch_key(), []).append(i)
        for idx in groups.values():
            try:
                results = self._run([requests[i] for i in idx])
            except Exception as exc:  # noqa: BLE001 - reported to the clients of this group only
                logger.warning("generation failed for %d request(s): %s: %s", len(idx), type(exc).__name__, exc)
                with self._count_lock:
                    self.failed += len(idx)
                results = [exc] * len(idx)
            for i, res in zip(idx, results):
                out[i] = res
        return out  # type: ignore[return-value]

    def _run(self, reqs: list[GenerateRequest]) -> list[GenerateResult]:
        torch = self._torch
        pipe = self._slots.get()
        started = time.perf_counter()
        started_wall = time.time()
        ok = False
        try:
            first = reqs[0]
            with torch.inference_mode():
                images = pipe(
                    [r.prompt for r in reqs],
                    negative_prompt=[r.negative_prompt or "" for r in reqs],
                    height=first.height,
                    width=first.width,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    **self._call_kwargs,
                    generator=[torch.Generator(device="cpu").manual_seed(r.seed) for r in reqs],
                ).images
            ok = True
        finally:
            if ok:
                self._slots.put(pipe)
            else:  # the view's run state is unknown: drop it, give the pool a fresh pipeline
                try:
                    pipe.transformer.reset()
                finally:
                    self._slots.put(self._new_slot())
        generated = time.perf_counter()
        results = []
        for req, image in zip(reqs, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            now = time.perf_counter()
            timings = {
                "queue": round(1000 * max(0.0, started_wall - req.arrived), 1) if req.arrived else 0.0,
                "generate": round(1000 * (generated - started), 1),
                "encode": round(1000 * (now - generated), 1),
            }
            results.append(GenerateResult(png=buf.getvalue(), seed=req.seed, timings=timings, batch=len(reqs)))
        with self._count_lock:
            self.served += len(reqs)
        return results


class ThreadBackend:
    """The HTTP backend without Ray: each request runs in a worker thread on a slot of ``generator``.

    Example::

        from starlette.testclient import TestClient
        from tokprune.serve.http import asgi_app
        client = TestClient(asgi_app(ThreadBackend(ImageGenerator(DIR))))
    """

    def __init__(self, generator: ImageGenerator) -> None:
        self.generator = generator
        self.limits = generator.limits

    def describe(self) -> dict[str, Any]:
        return self.generator.describe()

    def check(self) -> None:
        self.generator.check()

    async def run(self, request: GenerateRequest) -> GenerateResult:
        import asyncio

        (result,) = await asyncio.to_thread(self.generator.generate_batch, [request])
        if isinstance(result, BaseException):
            raise result
        return result
