"""tokprune.export: every bucket of a schedule to ONNX (weights stored once), TensorRT engines, a manifest.

Public API (imported lazily, so ``import tokprune.export`` stays light):

- :class:`~tokprune.export.spec.BucketSpec` / :class:`~tokprune.export.spec.TensorSpec`: the one
  source of a bucket's tensor names, shapes and dtypes; :class:`Precision`, :class:`Backend`.
- :func:`~tokprune.export.exporter.export_model` with :class:`~tokprune.export.exporter.ExportConfig`:
  what ``tokprune-export`` runs.
- :func:`~tokprune.export.manifest.load_manifest` -> :class:`~tokprune.export.manifest.Manifest`,
  :func:`~tokprune.export.manifest.verify` -> list of problems: for the runtime.
- :mod:`tokprune.export.runners`: one runner per backend (PyTorch, ONNX Runtime, TensorRT, polygraphy), one life
  cycle; :func:`~tokprune.export.equivalence.check_equivalence`: ONNX Runtime vs PyTorch per bucket.
- :func:`~tokprune.export.tensorrt.build_engines`: what ``tokprune-build DIR`` runs (GPU + TensorRT).
- :func:`~tokprune.export.lint.lint_model`: TensorRT compatibility of an ONNX graph.

Example::

    from tokprune.export import ExportConfig, export_model, load_manifest, verify
    result = export_model(ExportConfig(model="sd3-tiny", budget=0.5, steps=8))
    assert verify(result.directory) == []
    specs = load_manifest(result.directory).bucket_specs()
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "BucketSpec": "tokprune.export.spec",
    "TensorSpec": "tokprune.export.spec",
    "Precision": "tokprune.export.spec",
    "Backend": "tokprune.export.spec",
    "ExportConfig": "tokprune.export.exporter",
    "ExportResult": "tokprune.export.exporter",
    "export_model": "tokprune.export.exporter",
    "Manifest": "tokprune.export.manifest",
    "load_manifest": "tokprune.export.manifest",
    "verify": "tokprune.export.manifest",
    "check_equivalence": "tokprune.export.equivalence",
    "build_engines": "tokprune.export.tensorrt",
    "lint_model": "tokprune.export.lint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokprune.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
