"""The HTTP surface, independent of Ray: one function answers every request.

:func:`handle` maps ``(method, path, body)`` to an :class:`HttpReply` using a *backend* (anything
with ``limits``, ``describe()``, ``check()`` and ``async run(GenerateRequest) -> GenerateResult``). The Ray
Serve deployment calls it from ``__call__``; :func:`asgi_app` wraps it as a Starlette app for tests
and for running without Ray. Routes:

- ``POST /generate``: JSON body (see :mod:`tokprune.serve.request`) -> ``image/png`` (timings in
  ``X-Tokprune-*`` headers), or JSON with the PNG as base64 and timings when ``"format": "json"``.
- ``GET /healthz``: 200 while the replica can serve; ``GET /readyz``: 200 once the engines are
  loaded, with the limits a request must respect; ``GET /``: the API in one JSON object.

Errors are JSON ``{"error", "status", "message", "problems": [{"field", "got", "expected", "fix"}]}``:
4xx for the client's mistakes, 500 (one line, never a traceback) when a generation fails.
One log line per request with its timings.

Example::

    from starlette.testclient import TestClient
    client = TestClient(asgi_app(backend))
    client.post("/generate", json={"prompt": "a red circle", "seed": 1}).content  # PNG bytes
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokprune.errors import TokpruneError
from tokprune.serve.request import FIELDS, BadRequest, GenerateRequest, Limits, Problem, Said, parse_request

logger = logging.getLogger("tokprune.serve")

__all__ = ["Backend", "HttpReply", "ServeFailure", "asgi_app", "failure_of", "handle"]


class Backend(Protocol):
    limits: Limits

    def describe(self) -> dict[str, Any]: ...  # or a coroutine returning it

    def check(self) -> None: ...  # or a coroutine

    async def run(self, request: GenerateRequest) -> Any: ...


class ServeFailure(TokpruneError):
    """A request that reached generation and failed: ``status`` 422 (the engines refused it), 500 or 503."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> Any:  # crosses Ray's process boundary with its status
        return (ServeFailure, (str(self), self.status))


async def _maybe_await(value: Any) -> Any:
    import inspect

    return await value if inspect.isawaitable(value) else value


@dataclass
class HttpReply:
    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> HttpReply:
        return cls(status, json.dumps(payload).encode("utf-8"), "application/json", dict(headers or {}))


ROUTES = {("POST", "/generate"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/")}


async def handle(method: str, path: str, body: bytes, backend: Backend) -> HttpReply:
    """Answer one HTTP request; never raises (a failure becomes a JSON error reply)."""
    t0 = time.perf_counter()
    path = "/" + path.strip("/") if path.strip("/") else "/"
    reply = await _route(method.upper(), path, body, backend, time.time())
    total = 1000 * (time.perf_counter() - t0)
    reply.headers.setdefault("X-Tokprune-Total-Ms", f"{total:.1f}")
    if path != "/healthz":
        extra = reply.headers.get("X-Tokprune-Log", "")
        reply.headers.pop("X-Tokprune-Log", None)
        logger.info("%s %s %d %.1fms %s", method.upper(), path, reply.status, total, extra)
    else:
        reply.headers.pop("X-Tokprune-Log", None)
    return reply


async def _route(method: str, path: str, body: bytes, backend: Backend, arrived: float) -> HttpReply:
    if (method, path) not in ROUTES:
        allowed = sorted(f"{m} {p}" for m, p in ROUTES)
        known_path = any(p == path for _, p in ROUTES)
        status = 405 if known_path else 404
        return HttpReply.json(status, BadRequest([Problem(
            "path", Said(f"{method} {path}"), f"one of {', '.join(allowed)}",
            "POST a JSON body to /generate; GET /healthz or /readyz to probe")], status=status).to_json())
    if path == "/healthz":
        try:
            await _maybe_await(backend.check())
            info = await _maybe_await(backend.describe())
        except Exception as exc:  # noqa: BLE001
            return HttpReply.json(503, {"status": "unhealthy", "message": _one_line(exc)})
        return HttpReply.json(200, {"status": "ok", "pid": info.get("pid")})
    if path in ("/readyz", "/"):
        try:
            info = await _maybe_await(backend.describe())
        except Exception as exc:  # noqa: BLE001
            return HttpReply.json(503, {"status": "not ready", "message": _one_line(exc)})
        if path == "/":
            info = {"routes": sorted(f"{m} {p}" for m, p in ROUTES), "fields": list(FIELDS), **info}
        return HttpReply.json(200, {"status": "ready", **info})
    try:
        req = parse_request(body, backend.limits, arrived=arrived)
    except BadRequest as exc:
        return HttpReply.json(exc.status, exc.to_json(), {"X-Tokprune-Log": f"bad request: {exc}"[:300]})
    try:
        result = await backend.run(req)
    except BadRequest as exc:
        return HttpReply.json(exc.status, exc.to_json(), {"X-Tokprune-Log": f"bad request: {exc}"[:300]})
    except ServeFailure as exc:
        return HttpReply.json(exc.status, {"error": "generation failed" if exc.status >= 500 else "cannot run",
                                           "status": exc.status, "message": _one_line(exc)},
                              {"X-Tokprune-Log": f"{req.summary()} failed: {_one_line(exc)}"[:300]})
    except TokpruneError as exc:  # the runtime refused the call: the client's request cannot run on these engines
        return HttpReply.json(422, {"error": "cannot run", "status": 422, "message": _one_line(exc)},
                              {"X-Tokprune-Log": f"{req.summary()} refused: {_one_line(exc)}"[:300]})
    except Exception as exc:  # noqa: BLE001 - a server-side failure: one line, no traceback, replica keeps serving
        return HttpReply.json(500, {"error": "generation failed", "status": 500,
                                    "message": f"{type(exc).__name__}: {_one_line(exc)}; the request may be retried"},
                              {"X-Tokprune-Log": f"{req.summary()} failed: {type(exc).__name__}: {_one_line(exc)}"[:300]})
    t = result.timings
    log = (f"{req.summary()} batch={result.batch} queue={t.get('queue', 0):.0f}ms generate={t.get('generate', 0):.0f}ms "
           f"encode={t.get('encode', 0):.0f}ms pid={result.pid}" + (f" retried={result.retries}" if result.retries else ""))
    headers = {"X-Tokprune-Log": log, "X-Tokprune-Pid": str(result.pid), "X-Tokprune-Seed": str(result.seed),
               "X-Tokprune-Batch": str(result.batch), "X-Tokprune-Retries": str(result.retries)}
    headers.update({f"X-Tokprune-{k.title()}-Ms": f"{v:.1f}" for k, v in t.items()})
    if req.format == "json":
        return HttpReply.json(200, result.to_json(), headers)
    return HttpReply(200, result.png, "image/png", headers)


def failure_of(exc: BaseException) -> ServeFailure:
    """What a client is told about a failed generation (picklable, one line, no traceback)."""
    if isinstance(exc, ServeFailure):
        return exc
    if isinstance(exc, BadRequest):
        return ServeFailure(str(exc), exc.status)
    if isinstance(exc, TokpruneError):  # the runtime refused the call
        return ServeFailure(_one_line(exc), 422)
    return ServeFailure(f"{type(exc).__name__}: {_one_line(exc)}; the request may be retried", 500)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def asgi_app(backend: Backend) -> Any:
    """A Starlette app answering every path with :func:`handle` (tests, or serving without Ray)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        return await to_starlette(request, backend)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


async def to_starlette(request: Any, backend: Backend) -> Any:
    """Answer a ``starlette.requests.Request`` (what Ray Serve hands a deployment's ``__call__``)."""
    from starlette.responses import Response

    body = await request.body() if request.method in ("POST", "PUT", "PATCH") else b""
    path = request.scope.get("path", "/")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    reply = await handle(request.method, path, body, backend)
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
