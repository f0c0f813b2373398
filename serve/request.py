"""What a ``POST /generate`` body may contain, checked against what the engines can run.

:class:`Limits` is derived from an export's manifest (resolution, steps, guidance regime, batch);
:func:`parse_request` turns a JSON body into a :class:`GenerateRequest` or raises
:class:`BadRequest` listing every problem: the field, what was got, what was expected, and what
would work. Plain code (no pydantic): it runs in CI without the ``serve`` extra.

Example::

    limits = Limits(height=128, width=128, steps=8, guidance=7.0, cfg=True, images_per_call=1)
    req = parse_request(b'{"prompt": "a red circle", "seed": 3}', limits)
    assert req.guidance == 7.0 and req.steps == 8
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tokprune.errors import ConfigError
from tokprune.export.command import export_command

__all__ = ["BadRequest", "GenerateRequest", "Limits", "Problem", "parse_request"]

MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 64 * 1024
FORMATS = ("png", "json")
FIELDS = ("prompt", "negative_prompt", "seed", "guidance", "steps", "height", "width", "format")


@dataclass(frozen=True)
class Problem:
    """One wrong field: ``got`` is shown as the client sent it (shortened), ``expected`` and ``fix`` are prose."""

    field: str
    got: Any
    expected: str
    fix: str

    def message(self) -> str:
        return f"{self.field}: got {_show(self.got)}, expected {self.expected}; {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "got": _jsonable(self.got), "expected": self.expected, "fix": self.fix,
                "message": self.message()}


class BadRequest(ConfigError):
    """A request the server will not run; ``status`` is the HTTP code (400, 413, 415 or 422)."""

    def __init__(self, problems: list[Problem], status: int = 422) -> None:
        self.problems = list(problems)
        self.status = status
        super().__init__("; ".join(p.message() for p in self.problems))

    def __reduce__(self) -> Any:  # crosses Ray's process boundary (handle API) intact
        return (BadRequest, (self.problems, self.status))

    def to_json(self) -> dict[str, Any]:
        return {"error": "bad request", "status": self.status, "message": str(self),
                "problems": [p.to_json() for p in self.problems]}


@dataclass(frozen=True)
class Limits:
    """What one export can serve. Built with :meth:`from_manifest`; the defaults of a request are the engines'."""

    height: int
    width: int
    steps: int
    guidance: float
    cfg: bool  # True: engines' batch is 2 latents per image (guidance > 1 only)
    images_per_call: int
    max_prompt_chars: int = 2000
    max_guidance: float = 50.0
    rebuild: str = "tokprune-export --model MODEL --steps S --height H --width W --budget B"

    @classmethod
    def from_manifest(cls, manifest: Any, *, max_prompt_chars: int = 2000) -> Limits:
        data = manifest.data
        batch = int(manifest.geometry.batch)
        cfg = batch % 2 == 0 and float(data["guidance"]) > 1.0
        return cls(
            height=int(data["height"]), width=int(data["width"]), steps=int(data["steps"]),
            guidance=float(data["guidance"]), cfg=cfg, images_per_call=max(1, batch // 2 if cfg else batch),
            max_prompt_chars=int(max_prompt_chars),
            rebuild=export_command(data, height=None, width=None, steps=None, guidance=None, max_sequence_length=None),
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request; every field has its final value (defaults filled in from :class:`Limits`)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    guidance: float
    steps: int
    height: int
    width: int
    format: str = "png"
    arrived: float = field(default=0.0, compare=False)  # time.time() at arrival (queue time across processes)

    def batch_key(self) -> tuple[float, int, int, int]:
        """Requests with the same key can share one pipeline call."""
        return (self.guidance, self.steps, self.height, self.width)

    def summary(self) -> str:
        return f"seed={self.seed} guidance={self.guidance:g} prompt={self.prompt[:40]!r}"


def parse_body(body: bytes | str) -> Any:
    """JSON-decode a request body or raise :class:`BadRequest` (400 malformed, 413 too large)."""
    size = len(body)
    if size > MAX_BODY_BYTES:
        raise BadRequest([Problem("body", Said(f"{size} bytes"), f"at most {MAX_BODY_BYTES} bytes of JSON",
                                  "send a shorter prompt")], status=413)
    if not body or not str(body if isinstance(body, str) else body.decode("utf-8", "replace")).strip():
        raise BadRequest([Problem("body", Said("an empty body"), 'a JSON object such as {"prompt": "a red circle", "seed": 0}',
                                  "send the request as JSON with Content-Type: application/json")], status=400)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BadRequest([Problem("body", Said(f"malformed JSON ({where})"),
                                  'a JSON object such as {"prompt": "a red circle", "seed": 0}',
                                  "fix the JSON (double-quoted keys and strings, no trailing commas)")], status=400) from None


def parse_request(body: bytes | str | dict, limits: Limits, *, arrived: float = 0.0) -> GenerateRequest:
    """Validate a body (bytes, str or an already decoded dict) against ``limits``; raise :class:`BadRequest`."""
    payload = body if isinstance(body, dict) else parse_body(body)
    if not isinstance(payload, dict):
        raise BadRequest([Problem("body", Said(f"a JSON {_json_type(payload)}"), 'a JSON object such as {"prompt": "a red circle"}',
                                  "wrap the fields in an object")], status=400)
    problems: list[Problem] = []
    unknown = sorted(set(payload) - set(FIELDS))
    for name in unknown:
        problems.append(Problem(str(name), payload[name], f"one of the fields {', '.join(FIELDS)}",
                                f"remove {name!r} (the fields above are the whole API)"))
    prompt = _text(payload, "prompt", limits, problems, required=True)
    negative = _text(payload, "negative_prompt", limits, problems, required=False)
    seed = _integer(payload, "seed", 0, 0, MAX_SEED, "send an integer seed between 0 and 2**63-1", problems)
    guidance = _guidance(payload, limits, problems)
    steps = _fixed(payload, "steps", limits.steps, problems,
                   f"omit 'steps' or send {limits.steps}; other step counts need engines built for them: "
                   f"{limits.rebuild} --steps N")
    height = _fixed(payload, "height", limits.height, problems,
                    f"omit 'height' or send {limits.height}; other sizes need engines built for them: "
                    f"{limits.rebuild} --height H --width W")
    width = _fixed(payload, "width", limits.width, problems,
                   f"omit 'width' or send {limits.width}; other sizes need engines built for them: "
                   f"{limits.rebuild} --height H --width W")
    fmt = payload.get("format", "png")
    if fmt not in FORMATS:
        problems.append(Problem("format", fmt, f"one of {', '.join(map(repr, FORMATS))}",
                                "send 'png' for the image bytes or 'json' for base64 and timings"))
    if problems:
        raise BadRequest(problems)
    return GenerateRequest(prompt=prompt, negative_prompt=negative, seed=seed, guidance=guidance, steps=steps,
                           height=height, width=width, format=str(fmt), arrived=arrived)


# ---- field checks -----------------------------------------------------------------------------
def _text(payload: dict, name: str, limits: Limits, problems: list[Problem], *, required: bool) -> Any:
    if name not in payload or payload[name] is None:
        if required:
            problems.append(Problem(name, Said("nothing"), "a non-empty string", f'send e.g. "{name}": "a red circle"'))
        return None
    value = payload[name]
    if not isinstance(value, str):
        problems.append(Problem(name, value, f"a string, not a JSON {_json_type(value)}", f"send {name} as a quoted string"))
        return None
    if required and not value.strip():
        problems.append(Problem(name, value, "a non-empty string (not only spaces)", "describe the image to generate"))
    elif len(value) > limits.max_prompt_chars:
        problems.append(Problem(name, Said(f"{len(value)} characters"), f"at most {limits.max_prompt_chars} characters",
                                f"shorten the {name} (the text encoders read only its first tokens anyway)"))
    elif "\x00" in value:
        problems.append(Problem(name, value, "text without NUL characters", "remove the \\u0000 characters"))
    return value


def _integer(payload: dict, name: str, default: int, lo: int, hi: int, fix: str, problems: list[Problem]) -> int:
    if name not in payload or payload[name] is None:
        return default
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and lo <= value <= hi:
            return int(value)
        problems.append(Problem(name, value, f"an integer, not a JSON {_json_type(value)}", fix))
        return default
    if not lo <= value <= hi:
        problems.append(Problem(name, value, f"an integer in [{lo}, {hi}]", fix))
        return default
    return value


def _fixed(payload: dict, name: str, allowed: int, problems: list[Problem], fix: str) -> int:
    if name not in payload or payload[name] is None:
        return allowed
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        problems.append(Problem(name, value, f"the integer {allowed} (the engines are static-shape)", fix))
        return allowed
    if int(value) != allowed:
        problems.append(Problem(name, value, f"{allowed}: the engines were built for exactly that", fix))
    return allowed


def _guidance(payload: dict, limits: Limits, problems: list[Problem]) -> float:
    if "guidance" not in payload or payload["guidance"] is None:
        return limits.guidance
    value = payload["guidance"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(Problem("guidance", value, f"a number, not a JSON {_json_type(value)}",
                                f"send e.g. \"guidance\": {limits.guidance:g}"))
        return limits.guidance
    value = float(value)
    if limits.cfg:
        ok = math.isfinite(value) and 1.0 < value <= limits.max_guidance
        expected = f"a number in (1, {limits.max_guidance:g}]: the engines run 2 latents per image (classifier-free guidance)"
        fix = (f"send a guidance above 1 (the engines were calibrated with {limits.guidance:g}); guidance <= 1 needs "
               f"engines exported with it: {limits.rebuild} --guidance 1")
    else:
        ok = math.isfinite(value) and 0.0 <= value <= 1.0
        expected = "a number in [0, 1]: the engines run 1 latent per image (no classifier-free guidance)"
        fix = f"omit 'guidance'; guidance > 1 needs engines exported with it: {limits.rebuild} --guidance 7"
    if not ok:
        problems.append(Problem("guidance", value, expected, fix))
        return limits.guidance
    return value


# ---- display helpers --------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class Said(str):
    """A description of what was got (shown as is), as opposed to the client's value (shown with repr)."""


def _show(value: Any) -> str:
    text = str(value) if isinstance(value, Said) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    text = json.dumps(value)
    return value if len(text) <= 200 else text[:197] + "..."
