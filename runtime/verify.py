"""Checks before any engine runs: the export matches its manifest, this host, and the model.

:func:`verify_export` refuses a directory whose schema, files (size and sha256), I/O tables or
(TensorRT) build environment do not match, with a message that says what differs and the command
that rebuilds. :func:`check_fingerprint` refuses a transformer of another architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tokprune.export.spec import Backend

from tokprune.errors import BackendUnavailableError, ManifestError

logger = logging.getLogger(__name__)

__all__ = [
    "check_fingerprint",
    "load_reference_transformer",
    "rebuild_command",
    "transformer_config",
    "verify_export",
    "version_notes",
]


def rebuild_command(manifest: Any) -> str:
    """The command that re-creates this export (as recorded, else rebuilt from its fields)."""
    data = manifest.data
    recorded = data.get("command")
    if isinstance(recorded, str) and recorded.strip():
        return recorded.strip()
    from tokprune.export.command import export_command

    return export_command(data, out=manifest.directory, force=True)


def verify_export(
    directory: str | Path,
    backend: Backend,
    *,
    check_files: bool = True,
    trt_version: Callable[[], str | None] | None = None,
    gpu: Callable[[], dict | None] | None = None,
) -> Any:
    """Load the manifest and refuse anything that does not match this host and backend.

    Checks: schema / format (``load_manifest``), every file's size and sha256 (``verify``), the
    recorded I/O tables against this tokprune's ``BucketSpec.io()``, and for TensorRT the
    engine build environment (TensorRT version, GPU compute capability). Raises
    :class:`ManifestError` / :class:`BackendUnavailableError` saying what differs and the
    command that rebuilds. Returns the :class:`~tokprune.export.manifest.Manifest`.
    """
    from tokprune.export.manifest import load_manifest, verify

    directory = Path(directory)
    manifest = load_manifest(directory)
    manifest.bucket_specs()  # raises ManifestError if an I/O table differs from this tokprune's
    if check_files:  # the manifest's own fields (content hash, consistency), then every file's sha256
        problems = [p for p in verify(directory) if not p.startswith("unexpected file")]
        if problems:
            what = "the manifest was edited" if all(p.startswith("manifest:") for p in problems) else (
                "the files were modified or damaged")
            raise ManifestError(
                f"{directory} does not match its manifest: " + "; ".join(problems)
                + f". {what[0].upper() + what[1:]}; rebuild with: {rebuild_command(manifest)}"
            )
    for note in version_notes(manifest, backend):
        logger.warning("%s: %s", directory, note)
    if backend is Backend.TENSORRT:
        from tokprune.export import tensorrt as trt_env

        version = (trt_version or trt_env.tensorrt_version)()
        device = (gpu or trt_env.gpu_info)()
        problems = trt_env.engine_mismatches(manifest.data.get("engines"), trt_version=version, gpu=device)
        if problems:
            cls = BackendUnavailableError if (version is None or device is None) else ManifestError
            raise cls(
                f"{directory}: the TensorRT engines cannot run here: " + "; ".join(problems)
                + f". Build them on this host with: {trt_env.build_command(directory)}"
                + (" (or use --backend onnxruntime)" if cls is BackendUnavailableError else "")
            )
    return manifest


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "").split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def version_notes(manifest: Any, backend: Backend) -> list[str]:
    """Version differences between the export and this host that are allowed but worth a warning.

    Compatibility is decided by the schema version, the I/O tables and (TensorRT) the engine build
    environment; an older ONNX Runtime than the one that checked the export, or another diffusers
    for the PyTorch backend, only warns.
    """
    import importlib.metadata as md

    recorded = manifest.data.get("versions", {})
    notes = []
    checks = [("tokprune", "tokprune")]
    if backend is Backend.ONNXRUNTIME:
        checks.append(("onnxruntime", "onnxruntime"))
    if backend is Backend.TORCH:
        checks += [("torch", "torch"), ("diffusers", "diffusers")]
    for key, dist in checks:
        try:
            here = md.version(dist)
        except md.PackageNotFoundError:
            continue
        there = recorded.get(key)
        if there and _version_tuple(here)[:2] != _version_tuple(there)[:2]:
            notes.append(f"{key} {here} here, the export was made and checked with {there}")
    return notes


def transformer_config(manifest: Any) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config the engines were exported from.

    Uses ``manifest["transformer_config"]`` when the export records it; otherwise derives the
    shape-relevant keys from the recorded geometry (enough for the pipeline and the runtime;
    ``sample_size`` is the exported latent size, so the pipeline's default resolution is the
    engines').
    """
    g = manifest.geometry
    recorded = manifest.data.get("transformer_config")
    if isinstance(recorded, Mapping):
        check_fingerprint(manifest, dict(recorded), "the manifest's recorded transformer_config")
        # sample_size drives the pipeline's default resolution: make it the engines' resolution.
        return {**recorded, "sample_size": g.latent_hw[0]}
    return {
        "sample_size": g.latent_hw[0],
        "patch_size": g.patch,
        "in_channels": g.in_channels,
        "out_channels": g.out_channels,
        "num_layers": g.num_layers,
        "attention_head_dim": g.head_dim,
        "num_attention_heads": g.heads,
        "joint_attention_dim": g.joint_attention_dim,
        "caption_projection_dim": g.dim,
        "pooled_projection_dim": g.pooled_dim,
        "pos_embed_max_size": None,
        "dual_attention_layers": list(g.dual_attention_layers),
        "qk_norm": g.qk_norm,
    }


def check_fingerprint(manifest: Any, model_or_config: Any, what: str = "the model") -> None:
    """Refuse a transformer whose architecture fingerprint differs from the export's."""
    from tokprune.export.command import export_command
    from tokprune.models import fingerprint

    got = fingerprint(model_or_config)
    want = manifest.data["model"]["fingerprint"]
    if got != want:
        raise ManifestError(
            f"{what} has architecture fingerprint {got}, but the engines in {manifest.directory} were exported from "
            f"{manifest.data['model']['name']!r} (fingerprint {want}). Use that model, or re-export for yours: "
            f"{export_command(manifest.data, model='YOUR_MODEL')}"
        )


def load_reference_transformer(manifest: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The PyTorch transformer recorded in the manifest (for the ``torch`` backend)."""
    from tokprune.models import load_pipeline, resolve_model

    ref = manifest.data["model"]["ref"]
    source = resolve_model(ref)
    if source.kind == "builtin":
        from tokprune.pruning.family import family_for

        pipe = load_pipeline(ref)
        model = family_for(pipe).denoiser(pipe)  # pipe.transformer, or pipe.unet for U-Nets
    else:
        from diffusers import SD3Transformer2DModel

        from tokprune.models import dtype_kwarg

        try:
            model = SD3Transformer2DModel.from_pretrained(
                source.ref, subfolder="transformer", local_files_only=True, **dtype_kwarg(torch.float32)
            )
        except Exception as exc:
            raise BackendUnavailableError(
                f"the torch backend needs the PyTorch transformer of {ref!r}, which did not load "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass model= to load(), "
                "or use --backend onnxruntime"
            ) from exc
    check_fingerprint(manifest, model, f"model {ref!r}")
    from tokprune.export.onnx_export import cast_for_export

    model = model.eval().to(device)
    return cast_for_export(model, manifest.precision) if dtype != torch.float32 else model
