"""``tokprune-triton DIR OUT``: a Triton Inference Server model repository from an export.

Layout (``OUT/``)::

    tokprune_k0256_t0109/config.pbtxt      one model per bucket: onnxruntime backend with 1/model.onnx
    tokprune_k0256_t0109/1/model.onnx        (+ 1/weights.bin, hard-linked: one copy on disk for all buckets),
    ...                                      or platform tensorrt_plan with 1/model.plan where engines were built
    tokprune_pipeline/config.pbtxt         the Python-backend BLS model: PROMPT [, NEGATIVE_PROMPT, SEED, GUIDANCE]
    tokprune_pipeline/1/model.py             -> IMAGE (uint8 H x W x 3); runs the diffusers pipeline with the
    tokprune_pipeline/1/export/              tokprune runtime as its transformer; each step's bucket call is a
                                             BLS request to that bucket's model (tokprune.serve.triton_bls)

Every ``config.pbtxt`` is written as text and, when ``tritonclient`` is installed, parsed with
Triton's own ``ModelConfig`` protobuf schema before the repository is published (atomically).

Example::

    tokprune-triton engines/shapes-128x128-s8-b0.5 triton-repo
    tritonserver --model-repository triton-repo      # on a host with Triton (not these machines)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokprune.console import add_common, run_cli
from tokprune.errors import ConfigError, ManifestError
from tokprune.fsutil import describe_dir, replace_dir

logger = logging.getLogger(__name__)

__all__ = ["PIPELINE_MODEL", "bucket_model_name", "main", "parse_config", "write_repository"]

PIPELINE_MODEL = "tokprune_pipeline"
BUCKETS_FILE = "triton_buckets.json"
# Inside the BLS model's own files (Triton reads only model directories): marks a repository this command
# wrote, the only kind --force replaces and the only .partial it removes.
MARKER = f"{PIPELINE_MODEL}/1/export/written_by.json"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64"}

MODEL_PY = '''"""Triton Python-backend BLS model written by tokprune-triton: the denoising loop runs in tokprune.

Needs tokprune (and diffusers, torch) in this model's Python environment, e.g. an EXECUTION_ENV_PATH
conda-pack archive. The loop is not copied here: it is the diffusers pipeline with the tokprune runtime as its
transformer; each step's engine call is a BLS request to the step's bucket model.
"""

from tokprune.serve.triton_bls import TritonPythonModel  # noqa: F401
'''


def bucket_model_name(key: str) -> str:
    """Triton model name of a bucket (``k0256-t0109-probe`` -> ``tokprune_k0256_t0109_probe``)."""
    return "tokprune_" + key.replace("-", "_")


def _dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _tensor_block(kind: str, tensors: Sequence[tuple[str, str, Sequence[int], bool]]) -> str:
    rows = []
    for name, dtype, shape, optional in tensors:
        opt = " optional: true" if optional else ""
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(shape)}{opt} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def bucket_config(name: str, spec: Any, *, plan: bool, gpu: bool, instances: int) -> str:
    """``config.pbtxt`` text of one bucket model (static shapes: ``max_batch_size: 0``, full dims)."""
    def rows(tensors: Sequence[Any]) -> list[tuple[str, str, Sequence[int], bool]]:
        out = []
        for t in tensors:
            if t.dtype not in TRITON_TYPES:
                raise ConfigError(f"bucket {spec.key}: tensor {t.name} has dtype {t.dtype}, which has no Triton type here")
            out.append((t.name, TRITON_TYPES[t.dtype], t.shape, False))
        return out

    head = f'name: "{name}"\n'
    head += 'platform: "tensorrt_plan"\n' if plan else 'backend: "onnxruntime"\n'
    head += "max_batch_size: 0\n"
    kind = "KIND_GPU" if (gpu or plan) else "KIND_CPU"
    return (head + _tensor_block("input", rows(spec.inputs())) + _tensor_block("output", rows(spec.outputs()))
            + f"instance_group [ {{ count: {int(instances)} kind: {kind} }} ]\n")


def pipeline_config(height: int, width: int, *, gpu: bool, instances: int) -> str:
    """``config.pbtxt`` of the Python-backend BLS model."""
    return (
        f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensor_block("input", [("PROMPT", "TYPE_STRING", [1], False), ("NEGATIVE_PROMPT", "TYPE_STRING", [1], True),
                                  ("SEED", "TYPE_INT64", [1], True), ("GUIDANCE", "TYPE_FP32", [1], True)])
        + _tensor_block("output", [("IMAGE", "TYPE_UINT8", [height, width, 3], False)])
        + f"instance_group [ {{ count: {int(instances)} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
        + 'parameters: { key: "export_dir" value: { string_value: "export" } }\n'
    )


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text with Triton's ``ModelConfig`` schema (``tritonclient``); raises on any error."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError(f"validating config.pbtxt needs tritonclient ({exc}); pip install 'tokprune[serve]'") from None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def write_repository(
    directory: str | Path,
    out: str | Path,
    *,
    prefer: str = "auto",
    gpu: bool = False,
    instances: int = 1,
    pipeline_instances: int = 1,
    force: bool = False,
    validate: bool = True,
) -> dict[str, Any]:
    """Write the model repository for export ``directory`` into ``out``; returns a summary.

    ``prefer``: ``auto`` (TensorRT plan where built, else ONNX), ``onnx`` or ``tensorrt`` (fail without plans).
    ``gpu``: instance kind of the ONNX models and of the BLS model (plans always run on the GPU).
    The export is verified first (sha256 of every file, as ``tokprune-inspect --verify``).
    """
    from tokprune.export.manifest import load_manifest
    from tokprune.serve.cli import preflight

    directory, out = Path(directory).resolve(), Path(out)
    if prefer not in ("auto", "onnx", "tensorrt"):
        raise ConfigError(f"--prefer: got {prefer!r}, expected auto, onnx or tensorrt")
    manifest = load_manifest(directory)
    problems, _ = preflight(directory)
    if problems:
        raise ManifestError(f"{directory} does not match its manifest: " + "; ".join(problems)
                            + ". Re-export with tokprune-export ... --force (tokprune-inspect --verify lists the same)")
    _check_replaceable(out, force=force)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        if not (tmp / MARKER).is_file():  # never delete what this command did not make
            raise ConfigError(f"{tmp} exists and was not written by tokprune-triton ({describe_dir(tmp)}); "
                              "move it away and run again")
        shutil.rmtree(tmp)
    (tmp / MARKER).parent.mkdir(parents=True)
    (tmp / MARKER).write_text(json.dumps({"written_by": "tokprune-triton", "export": str(directory)}) + "\n")
    specs = manifest.bucket_specs()
    summary: dict[str, Any] = {"directory": str(directory), "models": {}}
    buckets: dict[str, str] = {}
    for key, spec in sorted(specs.items()):
        name = bucket_model_name(key)
        buckets[key] = name
        version = tmp / name / "1"
        version.mkdir(parents=True)
        engine = manifest.engine_path(key)
        use_plan = prefer != "onnx" and engine is not None and engine.is_file()
        if prefer == "tensorrt" and not use_plan:
            raise ConfigError(f"--prefer tensorrt: bucket {key} has no built engine in {directory}; build them on a GPU host "
                              f"with: tokprune-build {directory} (or use --prefer auto)")
        if use_plan:
            how = _link_or_copy(engine, version / "model.plan")
        else:
            how = _link_or_copy(manifest.onnx_path(key), version / "model.onnx")
            for extra in _external_files(manifest.onnx_path(key)):
                how += ", " + _link_or_copy(directory / extra, version / extra) + f" {extra}"
        text = bucket_config(name, spec, plan=use_plan, gpu=gpu, instances=instances)
        (tmp / name / "config.pbtxt").write_text(text)
        summary["models"][name] = {"bucket": key, "format": "tensorrt_plan" if use_plan else "onnx", "files": how}
    g = manifest.data
    bls = tmp / PIPELINE_MODEL / "1"
    (bls / "export").mkdir(parents=True, exist_ok=True)
    (bls / "model.py").write_text(MODEL_PY)
    shutil.copy2(directory / "manifest.json", bls / "export" / "manifest.json")
    (bls / "export" / BUCKETS_FILE).write_text(json.dumps(buckets, indent=2) + "\n")
    (tmp / PIPELINE_MODEL / "config.pbtxt").write_text(
        pipeline_config(int(g["height"]), int(g["width"]), gpu=gpu, instances=pipeline_instances))
    summary["models"][PIPELINE_MODEL] = {"bucket": None, "format": "python (BLS)", "files": "model.py, export/manifest.json"}
    if validate:
        for cfg in sorted(tmp.glob("*/config.pbtxt")):
            try:
                parsed = parse_config(cfg.read_text())
            except ConfigError:
                raise
            except Exception as exc:  # text_format.ParseError
                raise ConfigError(f"{cfg}: not a valid Triton ModelConfig: {exc}") from None
            if parsed.name != cfg.parent.name:
                raise ConfigError(f"{cfg}: name {parsed.name!r} differs from its directory {cfg.parent.name!r}")
        summary["validated"] = "every config.pbtxt parsed with tritonclient's model_config_pb2.ModelConfig"
    replace_dir(tmp, out)  # swap in; the old repository (checked above) goes only after the swap
    summary["out"] = str(out)
    return summary


def _check_replaceable(out: Path, *, force: bool) -> None:
    """OUT may be absent, empty, or (with ``force``) a repository this command wrote; nothing else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"OUT {out} is a file; choose a directory path")
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise ConfigError(f"OUT {out} exists and is not a repository written by tokprune-triton ({describe_dir(out)}); "
                          "it is never replaced, --force or not: choose another OUT (a new or empty directory)")
    if not force:
        raise ConfigError(f"OUT {out} already holds a tokprune-triton repository; pass --force to replace it, "
                          "or choose another OUT")


def _external_files(onnx_path: Path) -> list[str]:
    """Files an ONNX model's initializers point to (external data), relative to the model."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return sorted(files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokprune-triton", description=__doc__.split("\n\n")[0],
                                epilog="Example: tokprune-triton engines/shapes-128x128-s8-b0.5 triton-repo")
    p.add_argument("directory", type=Path, help="an export directory written by tokprune-export")
    p.add_argument("out", type=Path, help="the model repository to write")
    p.add_argument("--prefer", default="auto", help="auto (TensorRT plans where built, else ONNX), onnx or tensorrt")
    p.add_argument("--gpu", action="store_true", help="run the ONNX bucket models and the BLS model on the GPU")
    p.add_argument("--instances", type=int, default=1, help="instances per bucket model (default 1)")
    p.add_argument("--pipeline-instances", type=int, default=1, help="instances of the BLS model (default 1)")
    p.add_argument("--no-validate", action="store_true", help="skip parsing the configs with tritonclient")
    p.add_argument("--force", action="store_true", help="replace OUT")
    return add_common(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tokprune-triton`` (through the shared CLI runner): 0 ok, 1 failure, 2 bad input,
    130 interrupted (OUT is swapped in only when complete)."""
    return run_cli(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    summary = write_repository(args.directory, args.out, prefer=args.prefer, gpu=args.gpu, instances=args.instances,
                               pipeline_instances=args.pipeline_instances, force=args.force,
                               validate=not args.no_validate)
    for name, info in summary["models"].items():
        print(f"{name:32s} {info['format']:14s} {info['files']}")
    print(f"wrote {summary['out']}" + (f"; {summary['validated']}" if "validated" in summary else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
