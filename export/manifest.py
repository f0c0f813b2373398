"""``DIR/manifest.json``: what an export directory holds, how it was made, and how to check it.

The manifest is the contract between export and runtime. It records the versions of every
tool involved, the model (source and architecture fingerprint), the sampling settings the
schedule was calibrated for, the budget and achieved ``mac_fraction``, the schedule itself
(embedded, plus its file and sha256), and per bucket its I/O table (from
:meth:`~tokprune.export.spec.BucketSpec.io`), its files with sha256 and size, the TensorRT
lint findings and the ONNX Runtime equivalence report. When engines are built, the GPU,
compute capability, TensorRT version and build flags are recorded under ``engines``.

:data:`MANIFEST_SCHEMA` is the JSON Schema (the file ``engines/manifest.schema.json`` is
written from it and a test keeps the two identical).

Runtime-side API::

    from tokprune.export.manifest import load_manifest, verify

    problems = verify("engines/sd3-1024x1024-s28-b0.5")      # [] when every file re-hashes
    m = load_manifest("engines/sd3-1024x1024-s28-b0.5")
    for key, spec in m.bucket_specs().items():                 # BucketSpec per bucket
        path = m.engine_path(key) or m.onnx_path(key)
    m.step_buckets                                             # per step: bucket key or None (reuse)
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokprune.export.spec import BucketSpec, Precision, TensorSpec, geometry_from_dict

from tokprune.errors import ManifestError
from tokprune.hashing import json_sha256, sha256_file

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "SCHEMA_VERSION",
    "Manifest",
    "file_entry",
    "load_manifest",
    "sha256_file",
    "check_consistency",
    "check_integrity",
    "integrity",
    "verify",
    "verify_report",
    "write_manifest",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
FORMAT = "tokprune-export"

# ---- JSON Schema -------------------------------------------------------------------------------
_FILE = {
    "type": "object",
    "required": ["path", "sha256", "size"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "description": "relative to the directory"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "size": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype", "role"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "dtype": {"enum": ["float32", "float16", "bfloat16", "int64"]},
        "role": {"enum": ["input", "output"]},
        "cache": {"type": "string", "description": "Geometry.cache_specs key carried by this tensor"},
    },
    "additionalProperties": False,
}
_NULLABLE_STR = {"type": ["string", "null"]}
_EQUIVALENCE = {
    "type": "object",
    "required": ["status", "backend", "precision", "seed", "tolerance"],
    "properties": {
        "status": {"enum": ["passed", "failed", "skipped"]},
        "backend": {"type": "string"},
        "provider": {"type": "string"},
        "reference": {"type": "string"},
        "precision": {"enum": ["fp32", "fp16", "bf16"]},
        "seed": {"type": "integer"},
        "tolerance": {
            "type": "object",
            "required": ["atol", "rtol"],
            "properties": {"atol": {"type": "number"}, "rtol": {"type": "number"}},
        },
        "max_abs": {"type": "object", "additionalProperties": {"type": "number"}},
        "worst": {"type": "number"},
        "reason": {"type": "string"},
    },
}
_LINT = {
    "type": "object",
    "required": ["severity", "node", "op_type", "message"],
    "properties": {
        "severity": {"enum": ["error", "warning"]},
        "node": {"type": "string"},
        "op_type": {"type": "string"},
        "message": {"type": "string"},
    },
}
_BUCKET = {
    "type": "object",
    "required": ["key", "image_keep", "text_keep", "dense", "reuse", "precision", "steps", "io", "files", "exporter",
                 "lint", "equivalence"],
    "properties": {
        "key": {"type": "string", "pattern": "^k[0-9]{4,}-t[0-9]{4,}(-probe|-cached)?$"},
        "image_keep": {"type": "integer", "minimum": 1},
        "text_keep": {"type": "integer", "minimum": 1},
        "dense": {"type": "boolean"},
        "reuse": {"enum": ["noise", "features"]},
        "precision": {"enum": ["fp32", "fp16", "bf16"]},
        "record_text": {"type": "boolean"},
        "cached": {"type": "boolean", "description": "a step-caching bucket (U-Nets' DeepCache step; key ends in -cached)"},
        "steps": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "denoising steps that run it"},
        "io": {"type": "array", "items": _TENSOR, "minItems": 6},
        "files": {
            "type": "object",
            "required": ["onnx"],
            "properties": {"onnx": _FILE, "engine": _FILE},
            "additionalProperties": False,
        },
        "exporter": {"enum": ["dynamo", "torchscript"]},
        "export_seconds": {"type": "number", "minimum": 0},
        "lint": {"type": "array", "items": _LINT},
        "equivalence": _EQUIVALENCE,
        "weights": {"type": "object"},
    },
}
_GRAPH = {
    "type": "object",
    "description": "the single ONNX graph with the keep count K as a dynamic axis (export/dynamic.py): every bucket "
                   "runs it at its own shapes; TensorRT builds one engine from it with one static profile per bucket",
    "required": ["layout", "file", "exporter", "dims", "io", "profiles", "equivalence"],
    "properties": {
        "layout": {"const": "dynamic"},
        "file": _FILE,
        "exporter": {"enum": ["dynamo", "torchscript"]},
        "export_seconds": {"type": "number", "minimum": 0},
        "dims": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
        "io": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "dtype", "role"]}},
        "profiles": {
            "type": "array",
            "items": {"type": "object", "required": ["bucket", "shapes"],
                      "properties": {"bucket": {"type": "string"}, "shapes": {"type": "object"}}},
        },
        "lint": {"type": "array", "items": _LINT},
        "equivalence": {"type": "object", "additionalProperties": _EQUIVALENCE},
        "weights": {"type": "object"},
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tokprune.dev/schemas/manifest-v1.json",
    "title": "tokprune export manifest",
    "description": "DIR/manifest.json written by tokprune-export / tokprune-build (see engines/README.md).",
    "type": "object",
    "required": ["schema_version", "format", "created_utc", "versions", "model", "height", "width", "steps",
                 "guidance", "scheduler", "budget", "mac_fraction", "precision", "reuse", "opset", "geometry",
                 "schedule", "weights", "buckets", "step_buckets", "engines", "export_config"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "format": {"const": FORMAT},
        "created_utc": {"type": "string"},
        "command": {"type": "string"},
        "versions": {
            "type": "object",
            "required": ["tokprune", "python", "torch", "diffusers", "onnx", "onnxruntime", "tensorrt"],
            "properties": {
                "tokprune": {"type": "string"},
                "python": {"type": "string"},
                "torch": {"type": "string"},
                "diffusers": {"type": "string"},
                "onnx": {"type": "string"},
                "onnxruntime": {"type": "string"},
                "tensorrt": _NULLABLE_STR,
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "source", "ref", "fingerprint"],
            "properties": {
                "name": {"type": "string"},
                "source": {"enum": ["builtin", "hub", "local"]},
                "ref": {"type": "string"},
                "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            },
        },
        "transformer_config": {"type": "object", "description": "the SD3Transformer2DModel config (public keys)"},
        "height": {"type": "integer", "minimum": 1},
        "width": {"type": "integer", "minimum": 1},
        "steps": {"type": "integer", "minimum": 1},
        "guidance": {"type": "number"},
        "scheduler": {
            "type": "object",
            "required": ["class", "config"],
            "properties": {"class": {"type": "string"}, "config": {"type": "object"}},
        },
        "budget": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "mac_fraction": {"type": "number", "minimum": 0, "maximum": 1.000001},
        "precision": {"enum": ["fp32", "fp16", "bf16"]},
        "reuse": {"enum": ["noise", "features"]},
        "policy": {"type": "string"},
        "opset": {"type": "integer", "minimum": 18},
        "geometry": {
            "type": "object",
            "required": ["batch", "latent_hw", "text_tokens", "in_channels", "out_channels"],
            "description": "the model family's geometry of one call (its to_dict); U-Nets (family sd-unet) have no "
                           "patch / layer fields, every other family has SD3's",
            "if": {"required": ["family"], "properties": {"family": {"const": "sd-unet"}}},
            "then": {"required": ["family", "prune_level", "cache_depth", "deep_channels", "text_dim", "config_json"]},
            "else": {"required": ["patch", "num_layers", "heads", "head_dim", "joint_attention_dim", "pooled_dim"]},
        },
        "schedule": {
            "type": "object",
            "required": ["file", "embedded"],
            "properties": {"file": _FILE, "embedded": {"type": "object"}},
        },
        "weights": {
            "type": "object",
            "required": ["file", "tensors", "dense_weight_bytes", "stored_bytes"],
            "properties": {
                "file": _FILE,
                "tensors": {"type": "integer", "minimum": 0},
                "dense_weight_bytes": {"type": "integer", "minimum": 0},
                "stored_bytes": {"type": "integer", "minimum": 0},
                "ratio": {"type": "number"},
            },
        },
        "buckets": {"type": "array", "items": _BUCKET, "minItems": 1},
        "step_buckets": {"type": "array", "items": _NULLABLE_STR, "minItems": 1},
        "graph": {"oneOf": [{"type": "null"}, _GRAPH]},
        "prompt_stage": {
            "oneOf": [
                {"type": "null"},
                {"type": "object", "required": ["file", "inputs", "outputs", "equivalence"],
                 "description": "per-run conditions (export/prompt_stage.py): run once at the first step of a run",
                 "properties": {"file": _FILE, "inputs": {"type": "array"}, "outputs": {"type": "array"},
                                "equivalence": {"type": "object"}}},
            ]
        },
        "engines": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["tensorrt", "gpu", "flags", "built_utc"],
                    "properties": {
                        "tensorrt": {"type": "string"},
                        "gpu": {
                            "type": "object",
                            "required": ["name", "compute_capability"],
                            "properties": {
                                "name": {"type": "string"},
                                "compute_capability": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
                                "cuda": _NULLABLE_STR,
                            },
                        },
                        "flags": {"type": "object"},
                        "built_utc": {"type": "string"},
                        "timing_cache": _FILE,
                        "layout": {"enum": ["engine-per-bucket", "single-engine"]},
                        "engine": {**_FILE, "description": "single-engine layout: the one engine, a profile per bucket"},
                        "profiles": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                                     "description": "single-engine layout: bucket key -> optimisation profile index"},
                    },
                },
            ]
        },
        "export_config": {"type": "object", "description": "what identifies this export (compared on re-runs)"},
        "integrity": {
            "type": "object",
            "description": "content hash of every other field, written with the manifest; tokprune-inspect --verify "
                           "names the fields that changed since",
            "required": ["algorithm", "hash", "fields"],
            "properties": {
                "algorithm": {"const": "sha256"},
                "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "fields": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    },
}


# ---- files ---------------------------------------------------------------------------------------
def file_entry(directory: str | Path, relpath: str) -> dict[str, Any]:
    """``{"path", "sha256", "size"}`` of ``directory / relpath``."""
    p = Path(directory) / relpath
    return {"path": relpath, "sha256": sha256_file(p), "size": p.stat().st_size}


def write_manifest(directory: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary file + fsync + ``os.replace``), with its
    ``integrity`` block (:func:`integrity`) computed over every other field."""
    from tokprune.fsutil import atomic_write_text

    body = {k: v for k, v in data.items() if k != INTEGRITY_KEY}
    payload = {**body, INTEGRITY_KEY: integrity(body)}
    return atomic_write_text(Path(directory) / MANIFEST_FILE, json.dumps(payload, indent=2, allow_nan=False) + "\n")


# ---- integrity: which recorded fields changed since export ----------------------------------------
INTEGRITY_KEY = "integrity"


def _digest(value: Any) -> str:
    return json_sha256(value, default=str, allow_nan=True)  # a hand-edited NaN reads as a changed field


def _field_digests(data: Mapping[str, Any]) -> dict[str, str]:
    """Per field (``model.fingerprint``, ``steps``, ``buckets[k0064-t0080]``, ...) a short sha256."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if key == INTEGRITY_KEY:
            continue
        if key == "buckets" and isinstance(value, list):
            for i, b in enumerate(value):
                name = b.get("key", i) if isinstance(b, Mapping) else i
                out[f"buckets[{name}]"] = _digest(b)[:16]
        elif isinstance(value, Mapping) and value:
            for sub, v in value.items():
                out[f"{key}.{sub}"] = _digest(v)[:16]
        else:
            out[key] = _digest(value)[:16]
    return out


def integrity(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"algorithm": "sha256", "hash": ..., "fields": {...}}`` over everything but ``integrity``:
    model fingerprint, geometry, steps, buckets, files, schedule, engines, ... ."""
    body = {k: v for k, v in data.items() if k != INTEGRITY_KEY}
    return {"algorithm": "sha256", "hash": _digest(body), "fields": _field_digests(body)}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_integrity(data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, notes): the fields edited, added or removed since the manifest was written."""
    recorded = data.get(INTEGRITY_KEY)
    if recorded is None:
        return [], ["the manifest has no content hash (written by an older tokprune): its fields are not checked, "
                    "its files are; re-export to add one"]
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("fields"), Mapping):
        return ["manifest: its integrity block is damaged; re-export with tokprune-export ... --force"], []
    body = {k: v for k, v in data.items() if k != INTEGRITY_KEY}
    if _digest(body) == recorded.get("hash"):
        return [], []
    then, now = dict(recorded["fields"]), _field_digests(body)
    problems = []
    for name in sorted(set(then) | set(now)):
        if name not in now:
            if name.startswith("buckets["):
                problems.append(f"manifest: bucket {name[8:-1]} was removed from the manifest after export")
            else:
                problems.append(f"manifest: field {name} was removed after export")
        elif name not in then:
            problems.append(f"manifest: field {name} was added after export")
        elif then[name] != now[name] and name.startswith("buckets["):
            problems.append(f"manifest: bucket {name[8:-1]}'s entry was edited after export")
        elif then[name] != now[name]:
            problems.append(f"manifest: field {name} was edited after export (now {_short(_lookup(body, name))})")
    return problems or ["manifest: its content hash does not match (edited after export)"], []


def _lookup(body: Mapping[str, Any], name: str) -> Any:
    top, _, sub = name.partition(".")
    value = body.get(top)
    return value.get(sub) if sub and isinstance(value, Mapping) else value


def check_consistency(data: Mapping[str, Any]) -> list[str]:
    """Cross-field checks that hold for every export (old manifests without a hash too)."""
    problems = []
    keys = [b.get("key") for b in data.get("buckets", []) if isinstance(b, Mapping)]
    steps, plan = data.get("steps"), data.get("step_buckets", [])
    if isinstance(plan, list) and steps != len(plan):
        problems.append(f"manifest: steps is {steps!r} but step_buckets lists {len(plan)} steps")
    missing = sorted({k for k in plan if k is not None and k not in keys}) if isinstance(plan, list) else []
    for key in missing:
        where = [i for i, k in enumerate(plan) if k == key]
        problems.append(f"manifest: bucket {key} (run at steps {where}) is missing from the manifest's buckets")
    embedded = data.get("schedule", {}).get("embedded", {}) if isinstance(data.get("schedule"), Mapping) else {}
    for field in ("height", "width", "steps", "guidance", "budget"):
        if field in embedded and field in data and embedded[field] != data[field]:
            problems.append(f"manifest: {field} is {data[field]!r} but its embedded schedule says {embedded[field]!r}")
    fp = data.get("model", {}).get("fingerprint") if isinstance(data.get("model"), Mapping) else None
    if embedded.get("model_fingerprint") not in (None, fp):
        problems.append(f"manifest: model.fingerprint is {fp!r} but its embedded schedule was calibrated for "
                        f"{embedded['model_fingerprint']!r}")
    config = data.get("transformer_config")
    if isinstance(config, Mapping) and fp:
        from tokprune.models import fingerprint

        got = fingerprint(dict(config))
        if got != fp:
            problems.append(f"manifest: model.fingerprint is {fp!r} but its transformer_config has fingerprint {got!r}")
    return problems


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---- reading -------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """A loaded ``manifest.json`` with typed views; ``data`` is the raw JSON object."""

    directory: Path
    data: dict[str, Any]

    @property
    def precision(self) -> Precision:
        return Precision.parse(self.data["precision"])

    @property
    def reuse(self) -> str:
        return self.data["reuse"]

    @property
    def geometry(self):
        return geometry_from_dict(self.data["geometry"])

    @property
    def buckets(self) -> list[dict[str, Any]]:
        return list(self.data["buckets"])

    @property
    def keys(self) -> list[str]:
        return [b["key"] for b in self.data["buckets"]]

    @property
    def step_buckets(self) -> list[str | None]:
        """Per denoising step, the key of the bucket it runs, or None (reuse the previous prediction)."""
        return list(self.data["step_buckets"])

    @property
    def has_engines(self) -> bool:
        return self.data.get("engines") is not None

    def bucket(self, key: str) -> dict[str, Any]:
        for b in self.data["buckets"]:
            if b["key"] == key:
                return b
        raise ManifestError(f"{self.directory}: no bucket {key!r}; buckets are {self.keys}")

    def bucket_specs(self) -> dict[str, BucketSpec]:
        """Key -> :class:`BucketSpec`, checked against the I/O table recorded at export time."""
        g = self.geometry
        specs = {}
        for b in self.data["buckets"]:
            spec = BucketSpec.from_dict(b, g)
            recorded = [TensorSpec.from_dict(t) for t in b["io"]]
            if recorded != spec.io():
                raise ManifestError(
                    f"{self.directory}: bucket {b['key']}'s recorded I/O table differs from the one this tokprune "
                    f"derives (export made by tokprune {self.data['versions']['tokprune']}); re-export it"
                )
            specs[b["key"]] = spec
        return specs

    def onnx_path(self, key: str) -> Path:
        return self.directory / self.bucket(key)["files"]["onnx"]["path"]

    def engine_path(self, key: str) -> Path | None:
        entry = self.bucket(key)["files"].get("engine")
        return None if entry is None else self.directory / entry["path"]

    def prompt_stage_path(self) -> Path | None:
        """The per-run prompt stage graph (``prompt_stage.onnx``), or None when the export has none."""
        entry = self.data.get("prompt_stage")
        return None if not entry else self.directory / entry["file"]["path"]

    def graph_path(self) -> Path | None:
        """The single dynamic-K graph (``graph.onnx``), or None when the export has none."""
        entry = self.data.get("graph")
        return None if not entry else self.directory / entry["file"]["path"]

    def single_engine(self) -> tuple[Path, dict[str, int]] | None:
        """(the one TensorRT engine, bucket key -> profile index) of a single-engine build, else None."""
        engines = self.data.get("engines")
        if not engines or engines.get("layout") != "single-engine":
            return None
        return self.directory / engines["engine"]["path"], dict(engines["profiles"])

    def schedule(self):
        """The embedded :class:`tokprune.calibrate.schedule.Schedule`."""
        from tokprune.calibrate.schedule import Schedule

        return Schedule.from_dict(self.data["schedule"]["embedded"], source=f"{self.directory}/{MANIFEST_FILE}")

    def files(self) -> list[dict[str, Any]]:
        """Every file the manifest vouches for (shared files, then per bucket)."""
        entries = [self.data["schedule"]["file"], self.data["weights"]["file"]]
        if self.data.get("graph"):
            entries.append(self.data["graph"]["file"])
        if self.data.get("prompt_stage"):
            entries.append(self.data["prompt_stage"]["file"])
        engines = self.data.get("engines")
        if engines and engines.get("timing_cache"):
            entries.append(engines["timing_cache"])
        if engines and engines.get("engine"):
            entries.append(engines["engine"])
        for b in self.data["buckets"]:
            entries.extend(b["files"].values())
        return entries


_REQUIRED = MANIFEST_SCHEMA["required"]


def load_manifest(directory: str | Path) -> Manifest:
    """Read ``DIR/manifest.json``; :class:`ManifestError` if missing, unreadable, of another schema version or incomplete."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        hint = "an export is still running or was interrupted" if _partial_sibling(directory).exists() else (
            "this is not a tokprune export directory"
        )
        raise ManifestError(f"{path} does not exist ({hint}); create it with tokprune-export --model MODEL --budget B")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({exc}); re-export with tokprune-export ... --force") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema_version") != SCHEMA_VERSION or data.get("format") != FORMAT:
        raise ManifestError(
            f"{path}: format {data.get('format')!r} schema_version {data.get('schema_version')!r}; this tokprune reads "
            f"{FORMAT!r} version {SCHEMA_VERSION}. Re-export with this version of tokprune-export"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{path}: missing keys {missing}; the file is truncated or hand-edited, re-export it")
    return Manifest(directory=directory, data=data)


def _partial_sibling(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.partial"


def verify(directory: str | Path) -> list[str]:
    """Check the manifest itself and re-hash every file it lists; one line per problem.

    Reports manifest fields edited, added or removed since export (:func:`check_integrity`),
    inconsistent fields (:func:`check_consistency`), files missing or whose size or sha256
    differ, a bucket removed from the manifest (its file still here), files the manifest does not
    know, and a manifest that does not load. An empty list: exactly what was exported (and built).
    """
    return verify_report(directory)[0]


def verify_report(directory: str | Path) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of :func:`verify`; notes are not failures (e.g. an old manifest without a hash)."""
    directory = Path(directory)
    try:
        manifest = load_manifest(directory)
    except ManifestError as exc:
        return [str(exc)], []
    problems, notes = check_integrity(manifest.data)
    try:
        problems += check_consistency(manifest.data)
    except Exception as exc:  # noqa: BLE001 - a hand-edited manifest may have any shape
        problems.append(f"manifest: fields have unexpected types ({type(exc).__name__}: {exc})")
    removed = {p.split()[2] for p in problems if p.startswith("manifest: bucket ") and "removed" in p}
    removed |= {p.split()[2] for p in problems if p.startswith("manifest: bucket ") and "missing from" in p}
    known = {MANIFEST_FILE}
    try:
        entries = manifest.files()
    except (KeyError, TypeError, AttributeError) as exc:
        return problems + [f"manifest: its file list is damaged ({type(exc).__name__}: {exc}); re-export it"], notes
    for entry in entries:
        rel = entry["path"]
        known.add(rel)
        p = directory / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            problems.append(f"corrupted: {rel} (size {size} bytes, manifest says {entry['size']})")
            continue
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            problems.append(f"corrupted: {rel} (sha256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…)")
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in known and not p.name.startswith("."):
            bucket = p.name.split(".")[0]
            if bucket in removed:
                continue  # already reported as a bucket removed from the manifest
            problems.append(f"unexpected file: {rel}")
    return problems, notes
