"""The HTTP surface in-process (Starlette TestClient, no Ray): bad requests get a 4xx that names the field,
shows got vs expected and says what works; failures are one-line 500s and never poison the server."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="the HTTP tests need starlette and httpx (pip install -e '.[test]')")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (pip install -e '.[test]')")

from starlette.testclient import TestClient

from tokprune.serve.http import asgi_app
from tokprune.serve.request import MAX_BODY_BYTES, MAX_SEED, BadRequest, Limits, parse_request
from tokprune.serve.worker import GenerateResult

LIMITS = Limits(height=64, width=64, steps=4, guidance=5.0, cfg=True, images_per_call=1, max_prompt_chars=100,
                rebuild="tokprune-export --model sd3-tiny --budget 0.5")


class FakeBackend:
    """Records what reached generation; fails on demand (prompt 'boom')."""

    limits = LIMITS

    def __init__(self) -> None:
        self.seen: list = []

    def describe(self):
        return {"pid": 1, "limits": self.limits.describe()}

    def check(self):
        return None

    async def run(self, req):
        self.seen.append(req)
        if req.prompt == "boom":
            raise RuntimeError("onnxruntime exploded\nTraceback (most recent call last): ...")
        return GenerateResult(png=b"\x89PNG fake", seed=req.seed, timings={"queue": 1.0, "generate": 2.0, "encode": 0.5})


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    return TestClient(asgi_app(backend), raise_server_exceptions=False)


# (name, raw body or json payload, expected status, field named, words the message must contain)
BAD = [
    ("empty prompt", {"prompt": ""}, 422, "prompt", ["non-empty"]),
    ("blank prompt", {"prompt": "   "}, 422, "prompt", ["non-empty"]),
    ("missing prompt", {"seed": 1}, 422, "prompt", ["non-empty string", "send e.g."]),
    ("oversized prompt", {"prompt": "x" * 101}, 422, "prompt", ["101 characters", "at most 100"]),
    ("prompt not a string", {"prompt": 42}, 422, "prompt", ["a string", "number"]),
    ("prompt a list", {"prompt": ["a", "b"]}, 422, "prompt", ["array"]),
    ("negative prompt wrong type", {"prompt": "a", "negative_prompt": {"x": 1}}, 422, "negative_prompt", ["object"]),
    ("negative seed", {"prompt": "a", "seed": -1}, 422, "seed", ["-1", f"[0, {MAX_SEED}]"]),
    ("huge seed", {"prompt": "a", "seed": 2**70}, 422, "seed", [str(2**70)[:20], "2**63-1"]),
    ("seed as string", {"prompt": "a", "seed": "7"}, 422, "seed", ["'7'", "an integer, not a JSON string"]),
    ("seed fractional", {"prompt": "a", "seed": 1.5}, 422, "seed", ["1.5"]),
    ("seed boolean", {"prompt": "a", "seed": True}, 422, "seed", ["boolean"]),
    ("guidance <= 1 on CFG engines", {"prompt": "a", "guidance": 1.0}, 422, "guidance",
     ["2 latents per image", "--guidance 1"]),
    ("guidance huge", {"prompt": "a", "guidance": 1e9}, 422, "guidance", ["(1, 50]"]),
    ("guidance a string", {"prompt": "a", "guidance": "high"}, 422, "guidance", ["a number"]),
    ("steps the engines cannot run", {"prompt": "a", "steps": 28}, 422, "steps", ["28", "exactly", "--steps N"]),
    ("size the engines cannot run", {"prompt": "a", "height": 1024, "width": 64}, 422, "height",
     ["1024", "64", "--height H --width W"]),
    ("width fractional", {"prompt": "a", "width": 64.5}, 422, "width", ["static-shape"]),
    ("unknown field", {"prompt": "a", "num_images": 4}, 422, "num_images", ["one of the fields"]),
    ("bad format", {"prompt": "a", "format": "jpeg"}, 422, "format", ["'jpeg'", "'png'"]),
    ("malformed JSON", b'{"prompt": "a",}', 400, "body", ["malformed JSON", "line 1"]),
    ("not JSON at all", b"prompt=a red circle", 400, "body", ["malformed JSON"]),
    ("empty body", b"", 400, "body", ["empty body"]),
    ("JSON array body", b'["a red circle"]', 400, "body", ["a JSON array", "object"]),
    ("body too large", json.dumps({"prompt": "a" * (MAX_BODY_BYTES + 10)}).encode(), 413, "body",
     [f"at most {MAX_BODY_BYTES} bytes"]),
    ("NaN guidance", b'{"prompt": "a", "guidance": NaN}', 422, "guidance", ["nan"]),
]


@pytest.mark.parametrize("name,body,status,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_naming_field_got_expected_and_fix(client, backend, name, body, status, field, words):
    if isinstance(body, bytes):
        r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/generate", json=body)
    assert r.status_code == status, (name, r.status_code, r.text)
    data = r.json()
    assert "Traceback" not in r.text
    fields = [p["field"] for p in data["problems"]]
    assert field in fields, (name, data)
    problem = data["problems"][fields.index(field)]
    assert problem["expected"] and problem["fix"] and "got" in problem
    for word in words:
        assert word in data["message"], (name, word, data["message"])
    assert backend.seen == []  # nothing reached generation


def test_at_least_fifteen_bad_requests():
    assert len(BAD) >= 15


def test_every_problem_is_reported_at_once(client):
    r = client.post("/generate", json={"prompt": "", "seed": -3, "steps": 9, "guidance": "x"})
    assert r.status_code == 422
    assert [p["field"] for p in r.json()["problems"]] == ["prompt", "seed", "guidance", "steps"]


def test_unknown_route_and_method(client):
    r = client.get("/generate")
    assert r.status_code == 405 and "POST /generate" in r.json()["message"]
    r = client.post("/images", json={"prompt": "a"})
    assert r.status_code == 404 and r.json()["problems"][0]["field"] == "path"


def test_good_request_defaults_come_from_the_engines(client, backend):
    r = client.post("/generate", json={"prompt": "a red circle", "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == b"\x89PNG fake"
    assert r.headers["x-tokprune-seed"] == "3" and float(r.headers["x-tokprune-generate-ms"]) == 2.0
    (req,) = backend.seen
    assert (req.guidance, req.steps, req.height, req.width, req.negative_prompt) == (5.0, 4, 64, 64, None)


def test_json_format_carries_base64_and_timings(client):
    import base64

    r = client.post("/generate", json={"prompt": "a", "seed": 0, "format": "json", "steps": 4, "height": 64})
    assert r.status_code == 200
    data = r.json()
    assert base64.b64decode(data["image_png_base64"]) == b"\x89PNG fake" and data["timings_ms"]["generate"] == 2.0


def test_generation_failure_is_a_one_line_500_and_the_server_keeps_serving(client, caplog):
    caplog.set_level("INFO", logger="tokprune.serve")
    r = client.post("/generate", json={"prompt": "boom"})
    assert r.status_code == 500
    assert r.json()["message"] == "RuntimeError: onnxruntime exploded; the request may be retried"
    assert "Traceback" not in r.text
    assert client.post("/generate", json={"prompt": "fine"}).status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tokprune.serve"]
    assert len(lines) == 2 and "POST /generate 500" in lines[0] and "POST /generate 200" in lines[1]
    assert "generate=2ms" in lines[1]


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok", "pid": 1}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["limits"]["steps"] == 4
    assert "POST /generate" in client.get("/").json()["routes"]


def test_parse_request_accepts_integral_floats_and_explicit_defaults():
    req = parse_request({"prompt": "a", "seed": 4.0, "steps": 4.0, "guidance": 3}, LIMITS)
    assert (req.seed, req.steps, req.guidance) == (4, 4, 3.0)
    no_cfg = Limits(64, 64, 4, 1.0, cfg=False, images_per_call=1)
    with pytest.raises(BadRequest) as err:
        parse_request({"prompt": "a", "guidance": 3}, no_cfg)
    assert "1 latent per image" in str(err.value) and "--guidance 7" in str(err.value)
    assert parse_request({"prompt": "a", "guidance": 0.0}, Limits(64, 64, 4, 1.0, cfg=False, images_per_call=1)).guidance == 0.0


def test_bad_request_survives_pickling_with_its_problems():
    import pickle

    with pytest.raises(BadRequest) as err:
        parse_request({"prompt": "", "seed": -1}, LIMITS)
    back = pickle.loads(pickle.dumps(err.value))
    assert back.status == 422 and [p.field for p in back.problems] == ["prompt", "seed"] and str(back) == str(err.value)
