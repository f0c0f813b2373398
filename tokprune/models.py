"""Resolve ``--model NAME`` for every CLI, and build the offline tiny SD3 pipelines.

Three kinds of model source, one resolver:

- **builtin**: assembled in-process, no files, no network. ``sd3-tiny`` and ``sd3.5-tiny``
  ship here; code above this layer adds its own with :func:`register_builtin`, and installed
  packages declare theirs in the ``tokprune.models`` entry-point table
  (:data:`BUILTIN_ENTRY_POINT_GROUP`; ``shapes`` comes from :mod:`tokprune.yardstick` that way),
  so this module never imports the layers above it.
- **hub**: a Hugging Face hub id (``org/name``) or one of :data:`MODEL_ALIASES`
  (``sd3``, ``sd3.5-medium``, ``sd3.5-large``). Loaded from the local HF cache first;
  downloading is attempted only when the hub is reachable, so offline it fails in
  seconds with :class:`~tokprune.errors.ModelNotFoundError`.
- **local**: a diffusers pipeline directory (one with ``model_index.json``).

The tiny models (:func:`build_tiny_pipeline`, :func:`build_tiny_transformer`) are exact
SD3 / SD3.5 architectures at toy width, with random weights that are identical on every
machine for a given seed and torch version. At default call settings the tiny pipeline
makes a 64x64 px image from a 32x32 latent with 16 channels, so the transformer sees

- **N = 256 image tokens** (a 16x16 patch grid, patch 2), and
- **T = 77 + 256 = 333 text tokens** (77 CLIP + ``max_sequence_length=256`` T5, the same
  text length as SD3-medium; pass ``max_sequence_length=`` to the pipeline call to shorten
  the T5 part).

Random weights measure speed and plumbing, never quality.

Example:
    >>> from tokprune.models import resolve_model, build_tiny_pipeline
    >>> resolve_model("sd3")
    ModelSource(name='sd3', kind='hub', ref='stabilityai/stable-diffusion-3-medium-diffusers')
    >>> pipe = build_tiny_pipeline("sd3")  # doctest: +SKIP
    >>> image = pipe("a red circle", num_inference_steps=4, output_type="np").images  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import torch

from tokprune.errors import ConfigError, ModelNotFoundError
from tokprune.hashing import json_sha256

if TYPE_CHECKING:  # heavy: imported inside the functions that need them
    from importlib.metadata import EntryPoint

    from diffusers import StableDiffusion3Pipeline

logger = logging.getLogger(__name__)


class _EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' "modules ... should be kept in float32: []" notice: our ``.to(dtype)`` on a
    model with no such modules (an empty list) is exactly what it recommends."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return "should be kept in float32: []" not in record.getMessage()
        except Exception:  # noqa: BLE001
            return True


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())

__all__ = [
    "BUILTIN_ENTRY_POINT_GROUP",
    "MODEL_ALIASES",
    "ModelSource",
    "TINY_TRANSFORMER_CONFIG",
    "available_models",
    "build_tiny_pipeline",
    "call_defaults",
    "calibration_prompts",
    "dtype_kwarg",
    "set_call_defaults",
    "build_tiny_transformer",
    "fingerprint",
    "load_pipeline",
    "register_builtin",
    "resolve_model",
    "tiny_transformer_config",
]

# Short names for the real checkpoints. They resolve to hub ids; the weights are the user's
# business (gated on the hub, never downloadable in this workplace).
MODEL_ALIASES: dict[str, str] = {}  # filled from every model family's ``aliases`` (_load_families)

#: The entry-point table of built-in models that live above this layer. Each entry's name is the
#: ``--model`` name and its value a zero-argument loader (``module:function``) whose docstring's
#: first line describes the model. Read once, when a bare name is not found or the names are
#: listed, so ``--model shapes`` works from every CLI without any CLI importing the yardstick.
#: tokprune's own table is ``[project.entry-points."tokprune.models"]`` in pyproject.toml:
#: ``shapes = "tokprune.yardstick:load_shapes_pipeline"``.
BUILTIN_ENTRY_POINT_GROUP = "tokprune.models"

_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCAL_PATH_HINT = "--model /path/to/stable-diffusion-3-medium-diffusers"


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        name: canonical short name: the builtin or alias name, the hub id, or the local
            directory's base name.
        kind: ``"builtin"`` (built in-process), ``"hub"`` (Hugging Face hub id) or
            ``"local"`` (a diffusers pipeline directory).
        ref: what the loader consumes: the builtin name, the hub id, or the absolute path.
    """

    name: str
    kind: Literal["builtin", "hub", "local"]
    ref: str


@dataclass(frozen=True)
class _Builtin:
    name: str
    loader: Callable[[], StableDiffusion3Pipeline]
    description: str


_BUILTINS: dict[str, _Builtin] = {}
_providers_loaded = False


def register_builtin(
    name: str,
    loader: Callable[[], StableDiffusion3Pipeline],
    description: str,
    *,
    replace: bool = False,
) -> None:
    """Make ``--model NAME`` build a pipeline in-process with ``loader()``.

    Call it from code above this layer; an installed package can instead declare its model in
    the ``tokprune.models`` entry-point table (:data:`BUILTIN_ENTRY_POINT_GROUP`), which
    :func:`resolve_model` reads on a miss.

    Args:
        name: lower-case name, no ``/``; must not clash with an alias.
        loader: zero-argument callable returning a complete ``StableDiffusion3Pipeline``
            on CPU in float32 (:func:`load_pipeline` moves and casts it).
        description: one line shown in ``--help`` and in "unknown model" errors.
        replace: allow overwriting an existing registration (otherwise an error).

    Example:
        >>> from tokprune.models import register_builtin, build_tiny_pipeline, resolve_model
        >>> register_builtin("my-tiny", lambda: build_tiny_pipeline(seed=1), "tiny, seed 1")
        >>> resolve_model("my-tiny").kind
        'builtin'
    """
    if not name or name != name.strip().lower() or "/" in name:
        raise ConfigError(f"register_builtin: name {name!r} is invalid; expected lower case, no '/', e.g. 'shapes'.")
    if name in MODEL_ALIASES:
        raise ConfigError(f"register_builtin: {name!r} is already an alias for {MODEL_ALIASES[name]!r}; pick another.")
    if name in _BUILTINS and not replace:
        raise ConfigError(
            f"register_builtin: {name!r} is already registered ({_BUILTINS[name].description}); "
            f"pass replace=True to overwrite it."
        )
    if not callable(loader):
        raise ConfigError(f"register_builtin: loader for {name!r} must be callable, got {type(loader).__name__}.")
    _BUILTINS[name] = _Builtin(name, loader, description)


def available_models() -> dict[str, str]:
    """Every name ``--model`` accepts besides paths and hub ids, with a one-line description.

    Example:
        >>> available_models()["sd3"]
        'hub: stabilityai/stable-diffusion-3-medium-diffusers'
    """
    _load_families()
    _load_providers()
    names = {name: b.description for name, b in _BUILTINS.items()}
    names.update({alias: f"hub: {hub_id}" for alias, hub_id in MODEL_ALIASES.items()})
    return dict(sorted(names.items()))


def _builtin_entry_points() -> Iterable[EntryPoint]:
    """The installed entries of :data:`BUILTIN_ENTRY_POINT_GROUP` (a function, so tests can swap it)."""
    from tokprune.pruning.family import group_entry_points

    return list(group_entry_points(BUILTIN_ENTRY_POINT_GROUP).values())


_families_loaded = False


def _load_families() -> None:
    """Aliases and offline builtins of every model family (``tokprune.pruning.family``), once."""
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True
    from tokprune.pruning.family import all_families

    for family in all_families().values():
        for alias, hub_id in family.aliases.items():
            MODEL_ALIASES.setdefault(alias, hub_id)
        for name, (loader, description) in family.builtins().items():
            if name not in _BUILTINS:
                register_builtin(name, loader, description)


def _load_providers() -> None:
    """Register every entry of the ``tokprune.models`` table not registered in-process already (once)."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for entry in _builtin_entry_points():
        if entry.name in _BUILTINS:  # registered explicitly: that registration wins
            continue
        try:
            loader = entry.load()
        except ImportError as exc:  # a broken plugin must not break every other --model name
            logger.warning("built-in model %r (%s) could not be imported: %s", entry.name, entry.value, exc)
            continue
        doc = (getattr(loader, "__doc__", None) or "").strip()
        register_builtin(entry.name, loader, doc.splitlines()[0] if doc else f"from {entry.value}")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or text.endswith("/") or text.count("/") >= 2


def resolve_model(name_or_path: str) -> ModelSource:
    """Say where ``--model NAME`` comes from, without loading anything.

    Order: built-in names and aliases (case-insensitive), then an existing local path,
    then anything shaped like ``org/name`` as a hub id. A built-in name shadows a local
    directory of the same name; write ``./sd3`` to mean the directory.

    Raises:
        ModelNotFoundError: a path that does not exist, is not a directory, or has no
            ``model_index.json``.
        ConfigError: an unknown bare name; the message lists the valid names.

    Example:
        >>> resolve_model("sd3.5-tiny")
        ModelSource(name='sd3.5-tiny', kind='builtin', ref='sd3.5-tiny')
        >>> resolve_model("someone/my-sd3-finetune").kind
        'hub'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"--model expects a name, hub id or directory, got {type(name_or_path).__name__}.")
    text = os.fspath(name_or_path).strip()
    key = text.lower()
    _load_families()
    if key in _BUILTINS:
        return ModelSource(key, "builtin", key)
    if key in MODEL_ALIASES:
        return ModelSource(key, "hub", MODEL_ALIASES[key])

    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return _resolve_local(text, path)
    if _HUB_ID_RE.match(text):
        return ModelSource(text, "hub", text)

    _load_providers()  # a bare name: maybe a provider registers it
    if key in _BUILTINS:
        return ModelSource(key, "builtin", key)
    valid = ", ".join(available_models())
    raise ConfigError(
        f"--model {text!r} is not a known model name, an existing directory, or a hub id. "
        f"Valid names: {valid}; or a hub id like 'org/name'; or a local diffusers directory "
        f"({_LOCAL_PATH_HINT})."
    )


def _resolve_local(text: str, path: Path) -> ModelSource:
    if not path.exists():
        raise ModelNotFoundError(
            f"--model {text!r}: no such directory ({path.resolve()}). Expected a diffusers pipeline "
            f"directory containing model_index.json, e.g. {_LOCAL_PATH_HINT}."
        )
    if not path.is_dir():
        raise ModelNotFoundError(
            f"--model {text!r} is a file; expected a diffusers pipeline directory containing "
            f"model_index.json (single-file checkpoints are not supported: convert with "
            f"StableDiffusion3Pipeline.from_single_file(...).save_pretrained(DIR))."
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"--model {text!r}: {index.resolve()} is missing, so this is not a diffusers pipeline "
            f"directory. Point --model at the folder that holds model_index.json (it also has "
            f"transformer/, vae/, text_encoder/ ...), e.g. {_LOCAL_PATH_HINT}."
        )
    resolved = path.resolve()
    return ModelSource(resolved.name, "local", str(resolved))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_pipeline(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusion3Pipeline:
    """Load a complete ``StableDiffusion3Pipeline`` for any ``--model`` value.

    Built-ins are built in-process; local directories load with ``local_files_only``;
    hub ids load from the HF cache, and download only when the hub answers within 3 s
    and ``HF_HUB_OFFLINE`` is not set. Offline and uncached, it raises within seconds.

    Args:
        name_or_path: anything :func:`resolve_model` accepts.
        dtype: weights dtype. float32 on CPU (bf16 is ~4x slower on CPUs without bf16
            units); float16 or bfloat16 on GPU.
        device: where to put the pipeline.

    Raises:
        ModelNotFoundError: weights not cached and the hub unreachable, download failed,
            or a local directory that does not load.
        ConfigError: a local directory that holds another pipeline class.

    Example:
        >>> pipe = load_pipeline("sd3-tiny")  # doctest: +SKIP
        >>> pipe.transformer.config.num_layers  # doctest: +SKIP
        2
    """
    source = resolve_model(name_or_path)
    if source.kind == "builtin":
        return _BUILTINS[source.ref].loader().to(device=device, dtype=dtype)
    pipe = _load_local(source, dtype) if source.kind == "local" else _load_hub(source, dtype)
    from tokprune.pruning.family import family_for

    family_for(pipe)  # a pipeline no family prunes is refused here, naming the supported ones
    pipe = pipe.to(device=device, dtype=dtype)
    _realign_cpu_tensors(pipe)
    return pipe


def _realign_cpu_tensors(pipe: StableDiffusion3Pipeline) -> None:
    """Copy CPU weights that ``from_pretrained`` left at unaligned addresses into fresh storage.

    Tensors loaded from safetensors keep addresses that are 8-byte, not 64-byte, aligned;
    CPU BLAS then takes other code paths and results differ by ~1 ulp from the same
    weights built in memory (and may run slower). PyTorch's allocator aligns to 64 bytes.
    """
    moved = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
                    moved += 1
    logger.debug("re-aligned %d CPU tensors", moved)


def _load_local(source: ModelSource, dtype: torch.dtype) -> Any:
    import diffusers

    index_path = Path(source.ref) / "model_index.json"
    try:
        class_name = json.loads(index_path.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"--model {source.ref!r}: cannot read {index_path}: {exc}") from exc
    family = _family_of_class(str(class_name))
    if family is None:
        raise ConfigError(
            f"--model {source.ref!r} holds a {class_name or 'unnamed'} pipeline (model_index.json "
            f"_class_name); tokprune prunes {', '.join(_known_pipeline_classes())}. Point --model at a "
            f"diffusers directory of one of those."
        )
    try:
        return getattr(diffusers, str(class_name)).from_pretrained(source.ref, local_files_only=True, **dtype_kwarg(dtype))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"--model {source.ref!r}: the diffusers directory did not load ({_first_line(exc)}). "
            f"Check that every component folder listed in model_index.json is complete."
        ) from exc


def _load_hub(source: ModelSource, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    hub_id = source.ref
    try:
        return DiffusionPipeline.from_pretrained(hub_id, local_files_only=True, **dtype_kwarg(dtype))
    except Exception as exc:  # noqa: BLE001 - any failure here just means "not usable from the cache"
        cache_error = _first_line(exc)
        logger.debug("%s not loadable from the HF cache: %s", hub_id, cache_error)

    offline_reason = _offline_reason()
    if offline_reason is not None:
        raise ModelNotFoundError(
            f"--model {source.name!r}: the weights of hub id {hub_id!r} are not in the local "
            f"Hugging Face cache and this machine appears offline ({offline_reason}). Pass a local "
            f"diffusers directory instead, e.g. --model /path/to/{hub_id.rsplit('/', 1)[-1]}, or download it on a machine "
            f"with internet (`hf download {hub_id} --local-dir DIR`) and copy DIR here. "
            f"(cache lookup: {cache_error})"
        )
    logger.info("downloading %s from the Hugging Face hub", hub_id)
    try:
        return DiffusionPipeline.from_pretrained(hub_id, **dtype_kwarg(dtype))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors all land here
        hint = (f"Check the hub id and your network, or pass a local diffusers directory "
                f"(--model /path/to/{hub_id.rsplit('/', 1)[-1]}).")
        if "gated" in type(exc).__name__.lower() or "401" in str(exc) or "403" in str(exc):
            hint = f"The repo is gated: accept its licence on https://huggingface.co/{hub_id}, `hf auth login`. {hint}"
        raise ModelNotFoundError(
            f"--model {source.name!r}: downloading hub id {hub_id!r} failed ({_first_line(exc)}). {hint}"
        ) from exc


def _family_of_class(class_name: str) -> Any:
    from tokprune.pruning.family import all_families

    for family in all_families().values():
        if class_name in family.pipeline_classes:
            return family
    return None


def _known_pipeline_classes() -> list[str]:
    from tokprune.pruning.family import all_families

    return [c for f in all_families().values() for c in f.pipeline_classes]


def _offline_reason() -> str | None:
    """Why the hub must not be tried, or None when it answered within the probe timeout."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[BaseException | None] = []

    def probe() -> None:  # in a thread: getaddrinfo ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S + 0.5)
    if not result:
        return f"{host}:{port} did not answer within {_HUB_PROBE_TIMEOUT_S:.0f} s"
    if result[0] is not None:
        return f"cannot reach {host}:{port}: {result[0]}"
    return None


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers has renamed it (newer versions warn on ``torch_dtype``), else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - present since the rename
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


from tokprune.tiny import (  # noqa: E402  (re-exported: the public home of the tiny builders)
    TINY_TRANSFORMER_CONFIG,
    build_tiny_pipeline,
    build_tiny_transformer,
    tiny_transformer_config,
)



# --------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------


def fingerprint(model_or_config: Any) -> str:
    """16 hex chars identifying a transformer's architecture: sha256 of its canonical config.

    Keys starting with ``_`` (class name, diffusers version, source path) are dropped and
    tuples equal lists, so a model and its save/load round trip agree. Weights and dtype
    are not part of it: two checkpoints of one architecture share a fingerprint.

    Args:
        model_or_config: anything with a ``.config`` mapping (a diffusers model), or the
            mapping itself.

    Example:
        >>> from tokprune.models import build_tiny_transformer, fingerprint
        >>> fingerprint(build_tiny_transformer()) == fingerprint(build_tiny_transformer(seed=7))
        True
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"fingerprint expects a model with a .config mapping or the mapping itself, "
            f"got {type(model_or_config).__name__}."
        )
    public = {str(k): v for k, v in config.items() if not str(k).startswith("_")}
    return json_sha256(public, default=_json_default, allow_nan=True)[:16]


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise ConfigError(f"fingerprint: config value {value!r} ({type(value).__name__}) is not JSON-serialisable.")


def set_call_defaults(pipe: Any, defaults: Mapping[str, Any], *, calibration_prompts: Sequence[str] | None = None) -> Any:
    """Record on a loaded pipeline the call settings it must be sampled with (and its own calibration
    prompts), for loaders of models trained with non-default settings (the ``shapes`` yardstick).
    Calibration, export, the bench and the quality comparison read them through :func:`call_defaults`
    / :func:`calibration_prompts` whenever the user passes no value. Returns ``pipe``."""
    pipe._tokprune_call_defaults = dict(defaults)
    if calibration_prompts is not None:
        pipe._tokprune_calibration_prompts = [str(p) for p in calibration_prompts]
    return pipe


def calibration_prompts(pipe: Any) -> list[str] | None:
    """The model's own calibration prompts (:func:`set_call_defaults`; the ``shapes`` yardstick's
    train-split captions), or None for models that take the built-in general-purpose set."""
    prompts = getattr(pipe, "_tokprune_calibration_prompts", None)
    return list(prompts) if prompts else None


def call_defaults(pipe: Any) -> dict[str, Any]:
    """Keyword arguments a loaded model must be sampled with, e.g. ``{"max_sequence_length": 32}``
    (:func:`set_call_defaults`). Empty for stock pipelines (the family's / diffusers' defaults apply)."""
    return dict(getattr(pipe, "_tokprune_call_defaults", None) or {})
