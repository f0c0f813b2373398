"""The Ray Serve application: one deployment whose replicas each hold an :class:`ImageGenerator`.

:func:`build_app` returns a bound ``serve.Application`` (``serve.run`` it, or let
``tokprune-serve`` do it). Each model replica loads the engines and the pipeline once; a light ingress deployment answers HTTP
(:func:`tokprune.serve.http.to_starlette`) and the Python handle API (``generate(payload)``).
Requests are batched with ``@serve.batch`` (up to ``max_batch_size`` images per pipeline call,
``slots`` batches in flight per replica), so concurrent requests never share run state.

Example::

    from ray import serve
    from tokprune.serve.deployment import ServeOptions, build_app

    handle = serve.run(build_app("engines/shapes-128x128-s8-b0.5", ServeOptions(replicas=2)), route_prefix="/")
    out = handle.generate.remote({"prompt": "a red circle", "seed": 0}).result()
    open("circle.png", "wb").write(out["png"])
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ServeOptions", "build_app", "deployment_kwargs", "run_with_retry"]


@dataclass
class ServeOptions:
    """How many replicas, what each one holds and runs at once.

    ``replicas`` is fixed unless ``max_replicas`` is set (then Ray Serve autoscales between
    ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests`` per replica).
    ``max_batch_size``: images per pipeline call (default: the engines' batch, i.e. images per engine
    call); larger batches run the engines in chunks and share text-encoder / VAE calls.
    ``slots``: pipeline runs in flight per replica (each with its own scheduler, tokenizers, caches).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16
    max_queued_requests: int = -1
    max_batch_size: int | None = None
    batch_wait_ms: float = 5.0
    slots: int = 1
    backend: str = "onnxruntime"
    device: str | None = None
    threads: int | None = None
    max_prompt_chars: int = 2000
    name: str = "tokprune"

    def check(self) -> None:
        """Refuse inconsistent values (ConfigError naming the option)."""
        problems = []
        if self.replicas < 1:
            problems.append(f"--replicas: got {self.replicas}, expected >= 1")
        if self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            if not 0 <= lo <= self.max_replicas or self.max_replicas < 1:
                problems.append(f"--min-replicas/--max-replicas: got {lo}..{self.max_replicas}, expected 0 <= min <= max, max >= 1")
        if self.slots < 1:
            problems.append(f"--slots: got {self.slots}, expected >= 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            problems.append(f"--max-batch-size: got {self.max_batch_size}, expected >= 1")
        if self.max_ongoing_requests < 1:
            problems.append(f"--max-ongoing-requests: got {self.max_ongoing_requests}, expected >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            problems.append(f"--num-cpus/--num-gpus: got {self.num_cpus}/{self.num_gpus}, expected >= 0")
        if self.num_gpus > 0 and self.device is None:
            self.device = "cuda"
        if problems:
            raise ConfigError("; ".join(problems) + ". See tokprune-serve --help")


def deployment_kwargs(opts: ServeOptions) -> dict[str, Any]:
    """The ``@serve.deployment`` options for ``opts`` (replicas or autoscaling, resources, concurrency)."""
    kw: dict[str, Any] = {
        "name": opts.name,
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        "max_ongoing_requests": opts.max_ongoing_requests,
        "max_queued_requests": opts.max_queued_requests,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": 60.0,
        "logging_config": {"enable_access_log": False},  # tokprune.serve logs one line per request itself
    }
    if opts.max_replicas is not None:
        lo = opts.min_replicas if opts.min_replicas is not None else 1
        kw["autoscaling_config"] = {"min_replicas": lo, "max_replicas": opts.max_replicas,
                                    "initial_replicas": max(lo, min(opts.replicas, opts.max_replicas)),
                                    "target_ongoing_requests": opts.target_ongoing_requests}
    else:
        kw["num_replicas"] = opts.replicas
    return kw


def build_app(engine_dir: str | Path, opts: ServeOptions | None = None, *, images_per_call: int = 1) -> Any:
    """A bound Ray Serve application for ``engine_dir`` (absolute path; every node must see it).

    Two deployments: ``<name>`` (the replicas holding the pipeline, batched ``run``) and
    ``<name>-ingress`` (HTTP and the Python handle API: validates requests, calls a replica, and when
    the replica dies under a request retries it once on another one; requests are seeded, so the
    retry is exact).
    """
    from ray import serve

    opts = opts or ServeOptions()
    opts.check()
    max_batch = int(opts.max_batch_size or images_per_call)
    directory = str(Path(engine_dir).resolve())

    @serve.deployment(**deployment_kwargs(opts))
    class TokpruneModel:
        """One replica: the pipeline with the engines as its transformer."""

        def __init__(self, engine_dir: str, options: dict[str, Any]) -> None:
            from tokprune.serve.worker import ImageGenerator

            _replica_logging()
            o = ServeOptions(**options)
            self.generator = ImageGenerator(engine_dir, slots=o.slots, backend=o.backend, device=o.device,
                                            threads=o.threads, max_prompt_chars=o.max_prompt_chars)

        def describe(self) -> dict[str, Any]:
            info = self.generator.describe()
            info["max_batch_size"] = max_batch
            try:
                info["replica"] = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a replica
                pass
            return info

        def check_health(self) -> None:  # Ray Serve's periodic health check
            self.generator.check()

        async def run(self, request: Any) -> Any:
            """A GenerateResult, or the ServeFailure that tells the client what went wrong (never raises)."""
            from tokprune.serve.http import failure_of

            result = await self._batched(request)
            return failure_of(result) if isinstance(result, BaseException) else result

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0,
                     max_concurrent_batches=opts.slots)
        async def _batched(self, requests: list[Any]) -> list[Any]:
            return await asyncio.to_thread(self.generator.generate_batch, requests)

    @serve.deployment(name=f"{opts.name}-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=10_000, logging_config={"enable_access_log": False})
    class TokpruneIngress:
        """HTTP and the Python handle API in front of the model replicas."""

        def __init__(self, model: Any, engine_dir: str, options: dict[str, Any]) -> None:
            from tokprune.export.manifest import load_manifest
            from tokprune.serve.request import Limits

            _replica_logging()
            self.model = model
            self.limits = Limits.from_manifest(load_manifest(engine_dir),
                                               max_prompt_chars=int(options.get("max_prompt_chars", 2000)))

        async def __call__(self, request: Any) -> Any:
            from tokprune.serve.http import to_starlette

            return await to_starlette(request, self)

        async def describe(self) -> dict[str, Any]:
            return await self.model.describe.remote()

        async def check(self) -> None:
            await self.model.describe.remote()

        async def run(self, request: Any) -> Any:
            from ray import exceptions as rx

            return await run_with_retry(lambda: self.model.run.remote(request), request,
                                        lost=(rx.RayActorError, rx.ActorUnavailableError))

        async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
            """``handle.generate.remote({"prompt": ..., "seed": ...}).result()`` -> ``{"png": bytes, "timings_ms", ...}``.

            Raises :class:`tokprune.serve.request.BadRequest` (a ConfigError) for an invalid payload and
            :class:`tokprune.serve.http.ServeFailure` when generation fails.
            """
            import time

            from tokprune.serve.request import parse_request

            req = parse_request(dict(payload), self.limits, arrived=time.time())
            res = await self.run(req)
            return {"png": res.png, "seed": res.seed, "timings_ms": res.timings, "batch": res.batch, "pid": res.pid,
                    "retries": res.retries}

    options = asdict(opts)
    return TokpruneIngress.bind(TokpruneModel.bind(directory, options), directory, options)


async def run_with_retry(call: Any, request: Any, *, lost: tuple[type[BaseException], ...]) -> Any:
    """Await ``call()`` (a replica's ``run``); if the replica dies under it (``lost``), run it once more.

    Requests are seeded, so the second run gives the same image; its result carries ``retries=1``.
    A second death raises a 503 :class:`~tokprune.serve.http.ServeFailure` that says so; a result that
    is an exception (the replica's ServeFailure) is raised.
    """
    from tokprune.serve.http import ServeFailure

    for attempt in (1, 2):
        try:
            result = await call()
        except lost as exc:
            if attempt == 2:
                raise ServeFailure(f"the replica running this request died twice ({type(exc).__name__}); retry it "
                                   "(seeded requests give the same image)", 503) from None
            logging.getLogger("tokprune.serve").warning(
                "%s: its replica died (%s); retrying once on another replica", request.summary(), type(exc).__name__)
            continue
        if isinstance(result, BaseException):
            raise result
        result.retries = attempt - 1
        return result
    raise AssertionError("unreachable")


def _replica_logging() -> None:
    """One line per request on the replica's stderr (Ray streams it to the driver and its log files)."""
    log = logging.getLogger("tokprune.serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s tokprune-serve %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
