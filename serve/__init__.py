"""tokprune.serve: serve exported engines over HTTP on Ray Serve, and write a Triton model repository.

- ``tokprune-serve DIR``: a Ray Serve application (:mod:`tokprune.serve.deployment`) whose replicas
  hold the diffusers pipeline with the engines as its transformer; ``POST /generate``,
  ``GET /healthz``, ``GET /readyz`` (:mod:`tokprune.serve.http`), request checks
  (:mod:`tokprune.serve.request`), a per-request pipeline pool (:mod:`tokprune.serve.worker`).
- ``tokprune-triton DIR OUT``: a Triton Inference Server model repository
  (:mod:`tokprune.serve.triton`): one model per bucket plus a Python-backend BLS model that runs
  the denoising loop (:mod:`tokprune.serve.triton_bls`).
- ``python -m tokprune.serve.loadtest``: the load and fault test client.

Ray is an optional extra (``pip install 'tokprune[serve]'``); nothing here imports it until a
server starts.

Example (Python handle API)::

    from ray import serve
    from tokprune.serve import ServeOptions, build_app

    handle = serve.run(build_app("/abs/engines/shapes-128x128-s8-b0.5", ServeOptions(replicas=2)), route_prefix="/")
    png = handle.generate.remote({"prompt": "a red circle", "seed": 0}).result()["png"]
"""

from tokprune.serve.deployment import ServeOptions, build_app
from tokprune.serve.request import BadRequest, GenerateRequest, Limits, parse_request

__all__ = ["BadRequest", "GenerateRequest", "Limits", "ServeOptions", "build_app", "parse_request"]
