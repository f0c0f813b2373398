"""TensorRT engines from an exported directory: thin, lazy, through polygraphy's Python API.

Nothing here imports ``tensorrt`` or ``polygraphy.backend.trt`` at module import time, so
``--help``, ONNX export and every check derivable without TensorRT work on a CPU host. The
build itself is written against the documented TensorRT 10/11 API and cannot run in the
workplace that wrote it (no TensorRT, no GPU); everything around it (profiles, flags,
refusals, manifest entries, lint) is unit-tested.

Layout — **one engine with one static optimisation profile per bucket** (``layout="single"``, the
default when the export has its dynamic-K graph, :mod:`tokprune.export.dynamic`): the engine is
built from ``graph.onnx`` whose keep axis K is dynamic; each bucket is one profile with min = opt =
max = that bucket's shapes (:func:`graph_profile_shapes`), so TensorRT still picks kernels for
static shapes per bucket, but the weights are in the engine — and in GPU memory — once. The runtime
keeps one execution context per profile and one scratch allocation shared by all of them. The
dense probe variant (schedules that prune text) has an extra output and stays its own engine.

``layout="per-bucket"`` (``build_engines(DIR, layout="per-bucket")``) builds the static per-bucket
graphs as before: one engine each, every engine embedding its own copy of the weights (TensorRT
cannot share weights between engines without refit / weight streaming). Keep it for a GPU where a
per-bucket engine measures faster than the same bucket's profile of the single engine: TensorRT
fuses and plans memory for exactly one shape there, and a dense bucket skips the cache scatters of
the generic graph. Whether that happens is not measured yet (no GPU with TensorRT was available):
``results/gpu/scenario_gpu_ready.py`` measures both. All builds share one timing cache file.

Precision lives in the ONNX (weights and casts, with fp32 norms and softmax): the network is
parsed **strongly typed**, mandatory from TensorRT 11 (which removed the FP16/BF16 builder
flags) and used on 10.x as well so the explicit fp32 casts are obeyed there too. TF32 stays
off so fp32 engines match the fp32 ONNX.

Example (on a GPU host with TensorRT >= 10.9)::

    from tokprune.export.tensorrt import build_engines
    build_engines("engines/sd3-1024x1024-s28-b0.5")     # or: tokprune-build DIR
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokprune.export.spec import INPUT, BucketSpec, Precision

from tokprune.errors import BackendUnavailableError, ManifestError

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_DIR",
    "MIN_TENSORRT",
    "TIMING_CACHE_FILE",
    "availability",
    "build_command",
    "build_engine",
    "build_engines",
    "build_flags",
    "engine_mismatches",
    "gpu_info",
    "graph_profile_shapes",
    "profile_shapes",
    "require_tensorrt",
    "tensorrt_version",
]

MIN_TENSORRT = (10, 9)
ENGINE_DIR = "engines"
TIMING_CACHE_FILE = "timing.cache"
DEFAULT_OPT_LEVEL = 3  # TensorRT's default builder optimisation level (0-5); 5 builds much slower


def build_command(directory: str | os.PathLike) -> str:
    """The command that builds engines for an exported directory later, on a GPU host."""
    return f"tokprune-build {directory}"


# ---- environment -----------------------------------------------------------------------------
def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it does not import."""
    try:
        import tensorrt
    except Exception:  # noqa: BLE001 - ImportError, or a broken install whose native libs fail to load
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def gpu_info() -> dict[str, Any] | None:
    """``{"name", "compute_capability", "cuda"}`` of CUDA device 0, or None without a usable GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}
    except Exception:  # noqa: BLE001 - any CUDA initialisation failure means "no GPU here"
        return None


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def availability(
    *, trt_version: Callable[[], str | None] | None = None, gpu: Callable[[], dict | None] | None = None
) -> tuple[bool, str]:
    """(can build here, why not). Probes default to :func:`tensorrt_version` and :func:`gpu_info`."""
    trt_version = trt_version or tensorrt_version
    gpu = gpu or gpu_info
    version = trt_version()
    if version is None:
        return False, "TensorRT is not installed (pip install 'tokprune[tensorrt]', i.e. tensorrt>=10.9, on a GPU host)"
    if _parse_version(version) < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return False, f"TensorRT {version} is too old; tokprune needs >= {need}"
    if gpu() is None:
        return False, f"no CUDA GPU is visible (TensorRT {version} is installed)"
    return True, ""


def require_tensorrt(directory: str | os.PathLike, **probe: Any) -> None:
    """Raise :class:`BackendUnavailableError` (before any work) unless engines can be built here."""
    ok, why = availability(**probe)
    if not ok:
        raise BackendUnavailableError(
            f"cannot build TensorRT engines on this machine: {why}. Export the ONNX buckets here with "
            f"--backend onnx (or auto), then build the engines on a GPU host with TensorRT: {build_command(directory)}"
        )


# ---- what the build is made of (pure, tested without TensorRT) -------------------------------
def profile_shapes(spec: BucketSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max), all equal: the bucket's one static optimisation profile."""
    return {t.name: (t.shape, t.shape, t.shape) for t in spec.io() if t.role == INPUT}


def graph_profile_shapes(graph: Any) -> dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Bucket key -> input name -> (min, opt, max), all equal: the single engine's profiles, one per
    bucket, in the graph's bucket order (profile index = position). ``graph``: a
    :class:`~tokprune.export.dynamic.GraphSpec`."""
    return {key: {name: (shape, shape, shape) for name, shape in inputs.items()}
            for key, inputs in graph.profiles().items()}


def build_flags(precision: Precision | str, trt_version: str, *, opt_level: int = DEFAULT_OPT_LEVEL) -> dict[str, Any]:
    """The builder settings recorded in the manifest and passed to polygraphy's ``CreateConfig``."""
    precision = Precision.parse(precision)
    if not 0 <= int(opt_level) <= 5:
        raise ValueError(f"builder optimisation level {opt_level}; expected 0..5")
    return {
        "strongly_typed": True,  # precision from the ONNX; mandatory on TRT >= 11 (no FP16/BF16 flags there)
        "precision": precision.value,
        "tf32": False,
        "builder_optimization_level": int(opt_level),
        "profiles": "one static profile per bucket (min=opt=max)",
        "version_compatible": False,
        "hardware_compatibility_level": "none",
        "tensorrt_major": _parse_version(trt_version)[0],
    }


def engine_mismatches(recorded: dict[str, Any] | None, *, trt_version: str | None, gpu: dict | None) -> list[str]:
    """What differs between the build environment in a manifest's ``engines`` and this host.

    Engines run only on the TensorRT version and GPU architecture they were built for; the runtime
    refuses a mismatch with these lines and the rebuild command.
    """
    if recorded is None:
        return ["no TensorRT engines were built for this export"]
    problems = []
    if trt_version is None:
        problems.append(f"TensorRT is not installed here (engines built with {recorded['tensorrt']})")
    elif _parse_version(trt_version)[:2] != _parse_version(recorded["tensorrt"])[:2]:
        problems.append(f"TensorRT {trt_version} here, engines built with {recorded['tensorrt']}")
    if gpu is None:
        problems.append(f"no CUDA GPU here (engines built on {recorded['gpu']['name']})")
    elif gpu["compute_capability"] != recorded["gpu"]["compute_capability"]:
        problems.append(
            f"GPU {gpu['name']} (sm {gpu['compute_capability']}) here, engines built on {recorded['gpu']['name']} "
            f"(sm {recorded['gpu']['compute_capability']})"
        )
    return problems


# ---- the build (needs TensorRT + a GPU) --------------------------------------------------------
def build_engine(
    onnx_path: str | Path, spec: BucketSpec, engine_path: str | Path, *, timing_cache: str | Path, flags: dict[str, Any]
) -> None:
    """Parse ``onnx_path`` (strongly typed), build with one static profile, save the serialized engine.

    Written against polygraphy's documented loaders (``network_from_onnx_path``, ``Profile``,
    ``CreateConfig``, ``engine_from_network``, ``save_engine``); no shell command.
    """
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    network = network_from_onnx_path(str(onnx_path), strongly_typed=bool(flags["strongly_typed"]))
    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(spec).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    timing_cache = Path(timing_cache)
    config = CreateConfig(
        tf32=bool(flags["tf32"]),
        profiles=[profile],
        builder_optimization_level=int(flags["builder_optimization_level"]),
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
    )
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    save_engine(engine, path=str(engine_path))


def build_graph_engine(
    onnx_path: str | Path, graph: Any, engine_path: str | Path, *, timing_cache: str | Path, flags: dict[str, Any]
) -> None:
    """Parse the dynamic graph (strongly typed), build ONE engine with one static profile per bucket
    (profile ``i`` = ``graph.buckets[i]``), save it. Same polygraphy loaders as :func:`build_engine`."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    network = network_from_onnx_path(str(onnx_path), strongly_typed=bool(flags["strongly_typed"]))
    profiles = []
    for shapes in graph_profile_shapes(graph).values():
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles.append(profile)
    timing_cache = Path(timing_cache)
    config = CreateConfig(
        tf32=bool(flags["tf32"]),
        profiles=profiles,
        builder_optimization_level=int(flags["builder_optimization_level"]),
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
    )
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    save_engine(engine, path=str(engine_path))


GRAPH_ENGINE = f"{ENGINE_DIR}/graph.plan"


def build_engines(
    directory: str | os.PathLike,
    *,
    opt_level: int = DEFAULT_OPT_LEVEL,
    progress: bool = True,
    rebuild: bool = False,
    layout: str | None = None,
) -> dict[str, Any]:
    """Lint the ONNX, build the engines into ``DIR/engines/``, record the build in the manifest.

    ``layout``: ``"single"`` (one engine from ``graph.onnx``, a profile per bucket; the default when
    the export has that graph) or ``"per-bucket"`` (one engine per static bucket graph; the default
    for exports without it). Buckets the graph does not serve (the dense probe variant) get their own
    engine either way.

    Engines are written under temporary names and renamed, and the manifest is rewritten
    atomically only after every engine is built, so an interrupted build leaves the directory's
    manifest unchanged. Returns the manifest's new ``engines`` entry.

    Raises :class:`BackendUnavailableError` (before any work) without TensorRT >= 10.9 and a GPU,
    :class:`~tokprune.export.errors.LintError` naming the node TensorRT would reject.
    """
    from tokprune.export.lint import lint_model, raise_on_errors
    from tokprune.export.manifest import file_entry, load_manifest, utc_now, write_manifest
    from tqdm.auto import tqdm

    from tokprune.export.dynamic import LAYOUTS, graph_from_manifest

    from tokprune.errors import ConfigError

    directory = Path(directory)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of {list(LAYOUTS)}; pass layout='single' or 'per-bucket'")
    require_tensorrt(directory)
    manifest = load_manifest(directory)
    if manifest.has_engines and not rebuild:
        raise ManifestError(f"{directory} already has engines (built {manifest.data['engines']['built_utc']}); pass --rebuild")
    specs = manifest.bucket_specs()
    graph = graph_from_manifest(manifest.data, specs)
    if layout == "single" and graph is None:
        raise ConfigError(f"{directory} has no dynamic graph (one bucket, or exported before it existed); build with "
                          f"layout='per-bucket', or re-export it (tokprune-export ... --force)")
    single = graph is not None and layout != "per-bucket"
    own = [k for k in specs if not (single and k in graph.keys)]  # buckets built as their own engine
    sources = [manifest.onnx_path(k) for k in own] + ([manifest.graph_path()] if single else [])
    for path in sources:  # lint everything before spending minutes on the first build
        raise_on_errors(lint_model(path), str(path))
    version, gpu = tensorrt_version(), gpu_info()
    flags = build_flags(manifest.precision, version, opt_level=opt_level)
    (directory / ENGINE_DIR).mkdir(exist_ok=True)
    timing_cache = directory / TIMING_CACHE_FILE
    built: dict[str, str] = {}
    try:
        if single:
            build_graph_engine(manifest.graph_path(), graph, directory / f"{GRAPH_ENGINE}.partial",
                               timing_cache=timing_cache, flags=flags)
            built["graph"] = GRAPH_ENGINE
        for key in tqdm(own, desc="build engines", unit="engine", disable=not progress):
            rel = f"{ENGINE_DIR}/{key}.plan"
            tmp = directory / f"{rel}.partial"
            build_engine(manifest.onnx_path(key), specs[key], tmp, timing_cache=timing_cache, flags=flags)
            built[key] = rel
        for rel in built.values():
            os.replace(directory / f"{rel}.partial", directory / rel)
    finally:
        for rel in built.values():
            leftover = directory / f"{rel}.partial"
            if leftover.exists():
                leftover.unlink()
    for stale in (directory / ENGINE_DIR).glob("*.plan"):  # a rebuild in the other layout
        if f"{ENGINE_DIR}/{stale.name}" not in built.values():
            stale.unlink()
    data = manifest.data
    for bucket in data["buckets"]:
        bucket["files"].pop("engine", None)
        if bucket["key"] in built:
            bucket["files"]["engine"] = file_entry(directory, built[bucket["key"]])
    data["versions"]["tensorrt"] = version
    data["engines"] = {
        "tensorrt": version,
        "gpu": gpu,
        "flags": flags,
        "built_utc": utc_now(),
        "timing_cache": file_entry(directory, TIMING_CACHE_FILE),
        "layout": "single-engine" if single else "engine-per-bucket",
    }
    if single:
        data["engines"]["engine"] = file_entry(directory, GRAPH_ENGINE)
        data["engines"]["profiles"] = {key: i for i, key in enumerate(graph.keys)}
    write_manifest(directory, data)
    return data["engines"]


def remove_engines(directory: str | os.PathLike) -> None:
    """Drop built engines and their manifest entries (e.g. before shipping ONNX only)."""
    from tokprune.export.manifest import load_manifest, write_manifest

    directory = Path(directory)
    manifest = load_manifest(directory)
    data = manifest.data
    for bucket in data["buckets"]:
        bucket["files"].pop("engine", None)
    data["engines"] = None
    data["versions"]["tensorrt"] = None
    write_manifest(directory, data)
    shutil.rmtree(directory / ENGINE_DIR, ignore_errors=True)
    (directory / TIMING_CACHE_FILE).unlink(missing_ok=True)
