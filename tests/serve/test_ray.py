"""tokprune-serve's Ray Serve application end to end on a real sd3-tiny export (one local Ray, ~30 s).

Skips when Ray is not installed: CI installs only the test extra (`make test`); the serve extra brings Ray.
"""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve]'); CI's test extra omits it")
httpx = pytest.importorskip("httpx", reason="the HTTP check needs httpx (pip install -e '.[test]')")

from PIL import Image

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_export):
    import ray
    from ray import serve

    from tokprune.serve.deployment import ServeOptions, build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(tiny_export, ServeOptions(replicas=1, threads=1, num_cpus=1)), name="tokprune",
                           route_prefix="/")
        yield handle, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_http_and_handle_give_the_in_process_image(served, generator):
    from tokprune.serve.request import parse_request

    handle, url = served
    (want,) = generator.generate_batch([parse_request({"prompt": "a red circle", "seed": 5}, generator.limits)])
    r = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 5}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(io.BytesIO(want.png))))
    out = handle.generate.remote({"prompt": "a red circle", "seed": 5}).result()
    assert out["png"] == r.content and out["retries"] == 0
    with pytest.raises(Exception) as err:  # the handle API raises the same BadRequest (Ray wraps it)
        handle.generate.remote({"prompt": "", "seed": -2}).result()
    assert "prompt: got ''" in str(err.value) and "seed: got -2" in str(err.value)


def test_bad_requests_and_probes_through_ray(served):
    _, url = served
    r = httpx.post(f"{url}/generate", json={"prompt": "a", "steps": 50}, timeout=60)
    assert r.status_code == 422 and r.json()["problems"][0]["field"] == "steps" and "Traceback" not in r.text
    r = httpx.post(f"{url}/generate", content=b"{nope", timeout=60)
    assert r.status_code == 400 and "malformed JSON" in r.json()["message"]
    assert httpx.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
    ready = httpx.get(f"{url}/readyz", timeout=60).json()
    assert ready["status"] == "ready" and ready["limits"]["steps"] == 4
