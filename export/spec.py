"""One bucket's engine interface: the single source of tensor names, shapes and dtypes.

:class:`BucketSpec` derives every tensor a bucket engine reads or writes from the
:class:`~tokprune.pruning.geometry.Geometry` (never from a second shape formula). The ONNX
export (input/output names and order), the TensorRT optimisation profile, the ONNX Runtime
feeds, the sample inputs of the equivalence check, the manifest's I/O table and the
runtime's buffers all come from :meth:`BucketSpec.io`.

ONNX names (``B`` = batch with both CFG halves, ``K`` image tokens kept, ``N`` all image tokens):

============================  ==========================  =======  ======================================
name                          shape                       dtype    present
============================  ==========================  =======  ======================================
``latent``                    (B, C_in, H, W)             float    always
``encoder_hidden_states``     (B, T, joint_attention_dim) float    always (all T rows; txt_idx selects)
``pooled_projections``        (B, pooled_dim)             float    always
``timestep``                  (B,)                        float32  always (sinusoids are computed in fp32)
``img_idx``                   (B, K)                      int64    always (the dense bucket: a permutation of 0..N-1)
``txt_idx``                   (B, K_txt)                  int64    text pruned (K_txt < T)
``prev_noise``                (B, C_out, H, W)            float    K < N and reuse = "noise" (not U-Nets)
``cache.<name>``              ``geometry.cache_specs``    float    K < N (name e.g. ``blocks.0.k``)
``noise`` (output)            (B, C_out, H, W)            float    always
``fresh.<name>`` (output)     ``geometry.fresh_specs(K)`` float    always (the dense bucket fills the caches)
``text_mass`` (output)        (B, T)                      float32  ``record_text``: the dense *probe* variant
============================  ==========================  =======  ======================================

Which caches a bucket reads and writes is the family's
(:meth:`~tokprune.pruning.family.ModelFamily.bucket_caches`); the table above is the default (SD3,
PixArt). U-Nets (``sd-unet``) have no ``prev_noise`` (DaTo restores pruned tokens within the step);
a full step reads no cache and writes ``fresh.deep``, the whole DeepCache feature (copied into the run's
cache, never scattered by ``img_idx``); a *cached* step (key suffix ``-cached``, ``cached=True``) reads
``cache.deep`` and writes nothing.

When a schedule prunes text, the dense bucket is exported twice, sharing ``weights.bin``: the
plain dense bucket (``k1024-t0109``), which every dense step runs, and its probe variant
(``record_text=True``, key ``k1024-t0109-probe``: the same I/O plus ``text_mass``), which only
the steps in :meth:`~tokprune.pruning.plan.PrunePlan.probe_steps` run (the text-importance
probe costs :func:`~tokprune.pruning.macs.text_mass_macs`, about a sixth to a third of a dense call).

"float" is the bucket's precision (fp32 / fp16 / bf16). Cache names keep their dots
(``cache.blocks.0.k``): ONNX, ONNX Runtime and TensorRT accept them, and the part after the
prefix is exactly the :meth:`Geometry.cache_specs` key, so a runtime maps them back with
:attr:`TensorSpec.cache`.

Example::

    from tokprune.export.spec import BucketSpec, Precision
    spec = BucketSpec(geometry, image_keep=128, text_keep=333, precision=Precision.FP16)
    for t in spec.io():
        print(t.role, t.name, t.shape, t.dtype)
    feed = spec.sample_inputs(seed=0)          # name -> torch.Tensor, in input order
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tokprune.pruning.geometry import REUSE_MODES, Geometry

from tokprune.errors import ConfigError, ShapeError

__all__ = [
    "CACHE_PREFIX",
    "FRESH_PREFIX",
    "INPUT",
    "OUTPUT",
    "PROBE_SUFFIX",
    "CACHED_SUFFIX",
    "EXPORT_BACKENDS",
    "RUNTIME_BACKENDS",
    "Backend",
    "BucketSpec",
    "FeedError",
    "Precision",
    "TensorSpec",
    "bucket_key",
]

INPUT, OUTPUT = "input", "output"
CACHE_PREFIX = "cache."  # input name of a cache = CACHE_PREFIX + Geometry.cache_specs key
FRESH_PREFIX = "fresh."  # output name of its fresh rows = FRESH_PREFIX + the same key
PROBE_SUFFIX = "-probe"  # key of the dense bucket's text-importance probe variant = dense key + PROBE_SUFFIX
CACHED_SUFFIX = "-cached"  # key of a step-caching bucket (U-Nets' DeepCache steps) = its K/K_txt key + CACHED_SUFFIX


class Precision(str, enum.Enum):
    """Weights / activations dtype of an exported bucket. Norms and softmax always run in fp32."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @property
    def dtype_name(self) -> str:
        """The dtype string used in :class:`TensorSpec` and the manifest."""
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.value]

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        try:
            return cls(value.value if isinstance(value, cls) else str(value).lower())
        except ValueError:
            raise ConfigError(
                f"precision {value!r} is not one of {[p.value for p in cls]}; pass --precision fp32|fp16|bf16"
            ) from None


class Backend(str, enum.Enum):
    """Which engine kind runs a bucket: the one backend enum of export and runtime.

    ``TORCH``: the PyTorch pruned forward, eagerly (the numerical reference); ``ONNXRUNTIME``: the
    bucket's ONNX graph; ``TENSORRT``: built engines. ``AUTO`` is an export choice only (TensorRT
    engines where TensorRT and a GPU are present, else ONNX only); ``ONNX`` is an alias of
    ``ONNXRUNTIME`` (``tokprune-export --backend onnx``: ONNX files only). Each backend's runner
    lives in :mod:`tokprune.export.runners`.
    """

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    AUTO = "auto"
    ONNX = "onnxruntime"  # alias of ONNXRUNTIME

    @classmethod
    def parse(cls, value: Backend | str, *, choices: Mapping[str, Backend] | None = None) -> Backend:
        """``value`` (a member, its value or an alias: ort, onnx, trt, eager, pytorch) as a member.

        ``choices``: the spellings a caller accepts (:data:`EXPORT_BACKENDS`, :data:`RUNTIME_BACKENDS`);
        anything else raises :class:`ConfigError` listing them.
        """
        allowed = dict(choices) if choices is not None else {b.value: b for b in cls}
        text = value.value if isinstance(value, cls) else str(value).lower()
        member = allowed.get(text) or cls._value2member_map_.get(_BACKEND_ALIASES.get(text, text))
        if member is None or member not in allowed.values():
            raise ConfigError(
                f"backend {value!r} is not one of {list(allowed)}; pass --backend {'|'.join(allowed)}"
            ) from None
        return member  # type: ignore[return-value]


_BACKEND_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "eager": "torch", "pytorch": "torch"}
#: What ``tokprune-export --backend`` accepts: engines when possible, ONNX only, or TensorRT engines.
EXPORT_BACKENDS: dict[str, Backend] = {"auto": Backend.AUTO, "onnx": Backend.ONNXRUNTIME, "tensorrt": Backend.TENSORRT}
#: What a runtime runs (``tokprune.runtime.load(backend=...)``, ``tokprune-generate --backend``).
RUNTIME_BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend.ONNXRUNTIME, "tensorrt": Backend.TENSORRT, "torch": Backend.TORCH,
}


_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}


class FeedError(ShapeError):
    """A feed does not match a bucket's inputs (names, shapes, dtypes or device)."""


@dataclass(frozen=True)
class TensorSpec:
    """One engine tensor. ``cache`` is the :meth:`Geometry.cache_specs` key it carries, if any."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "bfloat16" | "int64"
    role: str  # INPUT | OUTPUT
    cache: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised buffer of this tensor's shape and dtype (runtime I/O buffers)."""
        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}
        if self.cache is not None:
            d["cache"] = self.cache
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"], d["role"], d.get("cache"))


def _family(geometry: Any) -> Any:
    from tokprune.pruning.family import get_family

    return get_family(geometry.family)


def condition_specs(geometry: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """The conditioning inputs of a bucket besides ``latent`` / ``timestep``, from the geometry's family."""
    return _family(geometry).condition_specs(geometry)


def bucket_key(image_keep: int, text_keep: int, *, probe: bool = False, cached: bool = False) -> str:
    """File-name key of a bucket, identical to :attr:`tokprune.calibrate.schedule.Bucket.key`.

    ``probe=True``: the key of the dense bucket's ``text_mass`` variant (``k1024-t0109-probe``);
    ``cached=True``: a step-caching bucket (``k0512-t0077-cached``).
    """
    return f"k{image_keep:04d}-t{text_keep:04d}" + (PROBE_SUFFIX if probe else "") + (CACHED_SUFFIX if cached else "")


@dataclass(frozen=True)
class BucketSpec:
    """The static interface of one bucket engine.

    Args that matter:
        geometry: shapes of one call (batch includes both CFG halves).
        image_keep: K image tokens computed (N = the dense bucket).
        text_keep: K_txt text rows kept; None means all T.
    Args to tinker with:
        reuse: ``"noise"`` (default; unselected rows reuse ``prev_noise``) or ``"features"``.
        precision: :class:`Precision` of weights and float I/O.
        record_text: also output ``text_mass``: the dense bucket's probe variant, run only at the
            steps that measure text importance before text pruning (its key ends in ``-probe``).
        cached: a step-caching step (families with ``step_caching``: U-Nets' DeepCache, only the outer
            blocks run on the cached deep feature); its key ends in ``-cached``.
    """

    geometry: Geometry
    image_keep: int
    text_keep: int | None = None
    reuse: str = "noise"
    precision: Precision = Precision.FP32
    record_text: bool = False
    cached: bool = False

    def __post_init__(self) -> None:
        g = self.geometry
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        text_keep = g.text_tokens if self.text_keep is None else self.text_keep
        object.__setattr__(self, "text_keep", text_keep)
        if not isinstance(self.image_keep, int) or not 1 <= self.image_keep <= g.num_tokens:
            raise ShapeError(f"image_keep = {self.image_keep!r}; expected an int in [1, N={g.num_tokens}]")
        if not isinstance(text_keep, int) or not 1 <= text_keep <= g.text_tokens:
            raise ShapeError(f"text_keep = {text_keep!r}; expected an int in [1, T={g.text_tokens}]")
        if self.reuse not in REUSE_MODES:
            raise ConfigError(f"reuse = {self.reuse!r}; expected one of {REUSE_MODES}")
        if self.record_text and not (self.dense and not self.prunes_text):
            raise ConfigError("record_text is only meaningful on the dense, full-text bucket")
        if self.cached and not _family(g).step_caching:
            raise ConfigError(f"a cached bucket needs a model family with step caching; {g.family} has none")

    # ---- views ------------------------------------------------------------------------
    @property
    def dense(self) -> bool:
        """K == N on a full step: no caches and no previous prediction are read."""
        return self.image_keep == self.geometry.num_tokens and not self.cached

    @property
    def prunes_text(self) -> bool:
        return self.text_keep < self.geometry.text_tokens

    @property
    def key(self) -> str:
        """Stable short name of the bucket (``k0128-t0333``, the probe variant ``k1024-t0333-probe``); names its files."""
        return bucket_key(self.image_keep, self.text_keep, probe=self.record_text, cached=self.cached)

    # ---- the I/O table -------------------------------------------------------------------
    def io(self) -> list[TensorSpec]:
        """Every input then every output, in the order the ONNX graph declares them."""
        g = self.geometry
        b, (h, w) = g.batch, g.latent_hw
        f = self.precision.dtype_name
        specs = [TensorSpec("latent", (b, g.in_channels, h, w), f, INPUT)]
        for name, (shape, dtype) in condition_specs(g).items():  # the family's conditioning inputs
            specs.append(TensorSpec(name, tuple(shape), f if dtype == "float" else dtype, INPUT))
        specs += [
            TensorSpec("timestep", (b,), "float32", INPUT),
            TensorSpec("img_idx", (b, self.image_keep), "int64", INPUT),
        ]
        if self.prunes_text:
            specs.append(TensorSpec("txt_idx", (b, self.text_keep), "int64", INPUT))
        family = _family(g)
        # unselected rows reuse the previous prediction, unless the family recomputes every token (U-Nets)
        if not self.dense and self.reuse == "noise" and not family.outputs_all_tokens:
            specs.append(TensorSpec("prev_noise", (b, g.out_channels, h, w), f, INPUT))
        reads, writes = family.bucket_caches(g, keep=self.image_keep, reuse=self.reuse, cached=self.cached)
        for name, shape in reads.items():
            specs.append(TensorSpec(CACHE_PREFIX + name, tuple(shape), f, INPUT, cache=name))
        specs.append(TensorSpec("noise", (b, g.out_channels, h, w), f, OUTPUT))
        for name, shape in writes.items():
            specs.append(TensorSpec(FRESH_PREFIX + name, tuple(shape), f, OUTPUT, cache=name))
        if self.record_text:
            specs.append(TensorSpec("text_mass", (b, g.text_tokens), "float32", OUTPUT))
        return specs

    def inputs(self) -> list[TensorSpec]:
        return [t for t in self.io() if t.role == INPUT]

    def outputs(self) -> list[TensorSpec]:
        return [t for t in self.io() if t.role == OUTPUT]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    # ---- data ---------------------------------------------------------------------------
    def sample_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A valid random feed (CPU tensors, input order): unique indices, finite activations.

        The dense bucket's ``img_idx`` is a random permutation (attention is key-order
        invariant, so any permutation must give the dense result); pruned buckets get K distinct
        random tokens per sample, ``txt_idx`` K_txt distinct sorted text rows.
        """
        gen = torch.Generator().manual_seed(int(seed))
        g = self.geometry
        feed: dict[str, torch.Tensor] = {}
        for t in self.inputs():
            if t.name == "img_idx":
                rows = [torch.randperm(g.num_tokens, generator=gen)[: self.image_keep] for _ in range(g.batch)]
                feed[t.name] = torch.stack(rows)  # (B, K)
            elif t.name == "txt_idx":
                rows = [torch.randperm(g.text_tokens, generator=gen)[: self.text_keep].sort().values for _ in range(g.batch)]
                feed[t.name] = torch.stack(rows)  # (B, K_txt)
            elif t.name == "timestep":
                feed[t.name] = torch.rand(t.shape, generator=gen) * 1000.0
            else:
                feed[t.name] = torch.randn(t.shape, generator=gen).to(t.torch_dtype)
        return feed

    def check_feed(self, feed: Mapping[str, Any], *, device: torch.device | None = None) -> None:
        """Raise :class:`FeedError` listing every missing, unexpected or mismatched input.

        Each part names the tensor, what it got and what the bucket expects, e.g.
        ``img_idx: got shape (2, 64) int64 on cpu, expected shape (2, 128) int64``. ``device``: also
        refuse tensors on another device type (runners pass theirs). The one feed check of every
        runner (:mod:`tokprune.export.runners`) and of the export's PyTorch reference.
        """
        problems = []
        expected = _inputs_by_name(self)
        for name, t in expected.items():
            x = feed.get(name)
            if x is None:
                problems.append(f"{name}: missing, expected shape {t.shape} {t.dtype}")
                continue
            if (isinstance(x, torch.Tensor) and x.shape == t.shape and x.dtype == t.torch_dtype
                    and (device is None or x.device.type == device.type)):
                continue  # the common case, without building strings
            shape, dtype = tuple(x.shape), str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")
            where = getattr(x, "device", None)
            bad_device = device is not None and isinstance(x, torch.Tensor) and x.device.type != device.type
            if shape != t.shape or dtype != t.dtype or bad_device:
                got = f" on {where}" if where is not None else ""
                want = f" on {device}" if bad_device else ""
                problems.append(f"{name}: got shape {shape} {dtype}{got}, expected shape {t.shape} {t.dtype}{want}")
        for name in feed:
            if name not in expected:
                problems.append(f"{name}: unexpected input (the bucket reads {sorted(expected)})")
        if problems:
            raise FeedError(f"bucket {self.key}: the feed does not match its I/O table: " + "; ".join(problems))

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The bucket's identity (not the geometry, which the manifest stores once); ``cached`` only when set."""
        d = {
            "key": self.key,
            "image_keep": self.image_keep,
            "text_keep": self.text_keep,
            "dense": self.dense,
            "reuse": self.reuse,
            "precision": self.precision.value,
            "record_text": self.record_text,
        }
        if self.cached:
            d["cached"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], geometry: Geometry) -> BucketSpec:
        return cls(
            geometry,
            int(d["image_keep"]),
            int(d["text_keep"]),
            reuse=d.get("reuse", "noise"),
            precision=Precision.parse(d.get("precision", "fp32")),
            record_text=bool(d.get("record_text", False)),
            cached=bool(d.get("cached", False)),
        )


@functools.lru_cache(maxsize=256)
def _cached_inputs(spec: BucketSpec) -> dict[str, TensorSpec]:
    return {t.name: t for t in spec.inputs()}


def _inputs_by_name(spec: BucketSpec) -> dict[str, TensorSpec]:
    """The bucket's inputs by name, built once per spec (``check_feed`` runs on every engine call)."""
    try:
        return _cached_inputs(spec)
    except TypeError:  # a geometry with an unhashable field: build it each time
        return {t.name: t for t in spec.inputs()}


def geometry_to_dict(g: Any) -> dict[str, Any]:
    """A geometry of any model family as JSON-able fields plus ``family``."""
    return g.to_dict()


def geometry_from_dict(d: Mapping[str, Any]) -> Any:
    """Inverse of :func:`geometry_to_dict` (manifests written before families existed are SD3)."""
    from tokprune.pruning.family import get_family

    return get_family(d.get("family", "sd3")).geometry_from_dict(d)
