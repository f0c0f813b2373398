"""The model-family interface: what a diffusion model family gives tokprune's generic machinery.

tokprune's sampler, calibration, export and runtime are written once; everything that depends on
the architecture of one family of denoisers (SD3's MMDiT, PixArt-Σ's DiT, the Stable Diffusion
U-Nets) sits behind :class:`ModelFamily`. A family is one module under ``families/`` (installed as
``tokprune.families.<name>``) exposing ``FAMILY``, and is found through the ``tokprune.families``
entry-point group declared in ``pyproject.toml`` — the same plugin mechanism pytest and
setuptools use — so this module never imports a family and adding one edits no other file::

    [project.entry-points."tokprune.families"]
    sd3 = "tokprune.families.sd3:FAMILY"

What a family provides, grouped by who uses it:

- **resolution and loading** (``tokprune.models``): ``aliases`` (``--model`` name → hub id),
  ``builtins`` (``--model`` name → offline pipeline builder), ``pipeline_class`` (the diffusers
  pipeline class name), :meth:`owns`.
- **call settings** (calibrate / export / runtime): :meth:`call_defaults`, :meth:`text_tokens`,
  :meth:`latent_hw`, from which :class:`CallSettings` and every geometry are derived.
- **one denoiser call** (the sampler, export buckets, engines): :meth:`geometry`,
  :meth:`parse_call`, :meth:`wrap_output`, :meth:`condition_specs`, :meth:`pruned_forward`,
  :meth:`tokens`; the geometry object itself counts MACs (``geometry.step_macs``) and names the
  per-block caches (``geometry.cache_specs``).
- **the sampling loop** (calibration rollouts re-run the pipeline's loop to measure whole runs):
  :meth:`encode`, :meth:`prepare_latents`, :meth:`guide`.

Example::

    from tokprune.pruning.family import family_for, get_family
    family = get_family("sd3")
    family = family_for(pipe)          # the family owning pipe's denoiser
    denoiser = family.denoiser(pipe)   # pipe.transformer (or pipe.unet for U-Nets)
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

#: The entry-point group families register under (``pyproject.toml``).
ENTRY_POINT_GROUP = "tokprune.families"

__all__ = [
    "CallSettings",
    "DenoiserCall",
    "ENTRY_POINT_GROUP",
    "ModelFamily",
    "all_families",
    "bind_call",
    "family_for",
    "get_family",
    "register_family",
]


@dataclass(frozen=True)
class DenoiserCall:
    """One call of a denoiser, in the family-independent form the sampler works with.

    ``latent`` (B, C, H, W) and ``timestep`` (B,) are what every family has; ``conditions`` holds the
    rest by name (SD3: ``encoder_hidden_states``, ``pooled_projections``), exactly the bucket inputs
    :meth:`ModelFamily.condition_specs` declares.
    """

    latent: torch.Tensor
    timestep: torch.Tensor
    conditions: dict[str, torch.Tensor]
    return_dict: bool = True


@dataclass(frozen=True)
class CallSettings:
    """How a pipeline will be called, resolved once: flags, else a schedule / manifest, else the
    model's defaults. Every geometry is derived from it (:meth:`geometry`).

    ``prompts`` is the number of prompts per pipeline call (times ``images_per_prompt`` rows);
    under classifier-free guidance (``guidance > 1``) the denoiser sees twice as many rows.
    ``max_sequence_length`` is the family's text-length knob (SD3 and PixArt: T5 tokens), None for
    families without one; ``text_tokens`` is the number of text rows the denoiser sees.
    """

    family: str
    height: int
    width: int
    steps: int
    guidance: float
    latent_hw: tuple[int, int]
    text_tokens: int
    max_sequence_length: int | None = None
    prompts: int = 1
    images_per_prompt: int = 1
    precision: str = "fp32"

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: the batch is ``[uncond; cond]``."""
        return self.guidance > 1.0

    @property
    def batch(self) -> int:
        """Rows of one denoiser call, both CFG halves included."""
        return self.prompts * self.images_per_prompt * (2 if self.cfg else 1)

    def geometry(self, denoiser_or_config: Any, *, batch: int | None = None) -> Any:
        """The family's geometry of one call with these settings (``batch``: override the rows)."""
        family = get_family(self.family)
        config = getattr(denoiser_or_config, "config", denoiser_or_config)
        return family.geometry(
            config, batch=self.batch if batch is None else int(batch), latent_hw=self.latent_hw,
            text_tokens=self.text_tokens,
        )

    def with_(self, **changes: Any) -> CallSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_hw"] = list(self.latent_hw)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CallSettings:
        d = dict(d)
        d["latent_hw"] = tuple(int(v) for v in d["latent_hw"])
        return cls(**d)



class ModelFamily(abc.ABC):
    """A family of denoisers tokprune can prune. Subclass, set the class attributes, implement the
    abstract methods, and expose an instance as ``FAMILY`` from the family's module."""

    #: Short name, also the entry-point name (``sd3``, ``pixart-sigma``, ``sd-unet``).
    name: str = ""
    #: Attribute of the pipeline holding the denoiser tokprune replaces (``transformer`` / ``unet``).
    denoiser_attr: str = "transformer"
    #: diffusers pipeline class names this family loads (``model_index.json`` ``_class_name``).
    pipeline_classes: tuple[str, ...] = ()
    #: diffusers denoiser class names this family prunes.
    denoiser_classes: tuple[str, ...] = ()
    #: ``--model`` aliases of real checkpoints: name -> hub id.
    aliases: Mapping[str, str] = {}
    #: The selection policy ``apply`` uses by default (``cat``; U-Nets: ``dynamics``, DaTo's).
    default_policy: str = "cat"
    #: Every output token is recomputed within a pruned step (U-Nets restore pruned tokens from kept ones),
    #: so a policy re-scores all rows; False where unselected rows reuse the previous prediction (CAT).
    outputs_all_tokens: bool = False
    #: Text-length knob bounds (``max_sequence_length``), None when the family has none.
    max_sequence_bounds: tuple[int, int] | None = None
    #: The pruned forward runs step-caching steps (``cached=True`` where :attr:`PrunePlan.step_cache` says;
    #: U-Nets: DeepCache). Calibration then searches a caching interval and export makes ``-cached`` buckets.
    step_caching: bool = False
    #: How a bucket's ``fresh.<name>`` output updates the run's cache: ``"rows"`` (the K fresh rows are
    #: scattered by ``img_idx``: per-block K/V caches) or ``"whole"`` (the output replaces the whole cache:
    #: U-Nets' DeepCache feature).
    cache_update: str = "rows"
    #: Buckets may share one graph with a dynamic keep axis (``export/dynamic.py``); False: one static
    #: graph per bucket only (its I/O differs per step kind, e.g. cached steps).
    dynamic_graph: bool = True

    # ---- resolution and loading ----------------------------------------------------------
    def builtins(self) -> Mapping[str, tuple[Callable[[], Any], str]]:
        """Offline pipelines this family ships: ``--model`` name -> (zero-argument builder, one-line description)."""
        return {}

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` (a pipeline or a denoiser module) belongs to this family."""
        names = {type(obj).__name__}
        denoiser = getattr(obj, self.denoiser_attr, None)
        if denoiser is not None:
            names.add(type(denoiser).__name__)
        return bool(names & set(self.denoiser_classes)) or type(obj).__name__ in self.pipeline_classes

    def bind_pipeline(self, pipe: Any, pruner: Any) -> None:
        """Instrument ``pipe`` so each call hands ``pruner`` what its denoiser cannot see: the special-token
        mask of the call's text rows (``pruner.call_text_protect``). Default: the SD3-style wrapper of
        ``encode_prompt`` (:mod:`tokprune.pruning.text`); families override it for their pipelines."""
        from tokprune.pruning.text import install_text_protect

        install_text_protect(pipe, lambda mask: setattr(pruner, "call_text_protect", mask))

    def unbind_pipeline(self, pipe: Any) -> None:
        """Undo :meth:`bind_pipeline`: the pipeline is bit for bit the original."""
        from tokprune.pruning.text import uninstall_text_protect

        uninstall_text_protect(pipe)

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The module tokprune prunes or replaces (``pipe.transformer`` / ``pipe.unet``), or ``pipe`` itself
        when it already is the denoiser."""
        if type(pipe).__name__ in self.denoiser_classes:
            return pipe
        module = getattr(pipe, self.denoiser_attr, None)
        if module is None:
            raise ConfigError(f"{type(pipe).__name__} has no .{self.denoiser_attr}; expected a {self.name} pipeline")
        return module

    # ---- call settings -------------------------------------------------------------------
    def call_defaults(self, pipe: Any) -> dict[str, Any]:
        """Call keyword arguments the loaded model is sampled with when the user gives none:
        the pipeline's recorded ones (:func:`tokprune.models.set_call_defaults`, used by loaders of
        models trained with non-default settings such as ``shapes``) over the family's."""
        from tokprune.models import call_defaults

        return call_defaults(pipe)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        """Default (height, width) in pixels of a pipeline call."""
        size = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return size, size

    def size_multiple(self, pipe: Any) -> int:
        """Image sizes must be multiples of this: the VAE scale factor times the denoiser's patch size."""
        patch = int(getattr(self.denoiser(pipe).config, "patch_size", None) or 1)
        return int(pipe.vae_scale_factor) * patch

    def latent_hw(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) of an image size; raises :class:`~tokprune.errors.ShapeError` when the size does not fit."""
        from tokprune.errors import ShapeError

        vsf, multiple = int(pipe.vae_scale_factor), self.size_multiple(pipe)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            dh, dw = self.default_size(pipe)
            raise ShapeError(
                f"resolution {height}x{width} is not a positive multiple of {multiple} (VAE scale factor {vsf} x "
                f"patch {multiple // vsf}); pass --height/--width that are multiples of {multiple}, e.g. {dh}x{dw}"
            )
        return height // vsf, width // vsf

    @abc.abstractmethod
    def text_tokens(self, pipe: Any, max_sequence_length: int | None) -> int:
        """Text rows the denoiser sees for a text-length setting."""

    def max_sequence_length_for(self, pipe: Any, text_tokens: int) -> int | None:
        """Inverse of :meth:`text_tokens`: the text-length setting giving ``text_tokens`` rows (None: no knob)."""
        return None

    def call_kwargs(self, pipe: Any, geometry: Any) -> dict[str, Any]:
        """Pipeline-call keyword arguments (besides size, steps, guidance) that make the denoiser see
        ``geometry``'s text length (SD3 / PixArt: ``max_sequence_length``)."""
        msl = self.max_sequence_length_for(pipe, geometry.text_tokens)
        return {} if msl is None else {"max_sequence_length": msl}

    def default_max_sequence_length(self, pipe: Any) -> int | None:
        """The text-length knob's default for this pipeline (None: the family has no knob)."""
        return None

    def settings(
        self,
        pipe: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        max_sequence_length: int | None = None,
        prompts: int = 1,
        images_per_prompt: int = 1,
        precision: str = "fp32",
        default_steps: int = 28,
        default_guidance: float = 7.0,
    ) -> CallSettings:
        """Resolve one :class:`CallSettings`: the given values, else the model's call defaults
        (:meth:`call_defaults`), else the pipeline's / family's defaults."""
        defaults = self.call_defaults(pipe)
        dh, dw = self.default_size(pipe)
        height = int(height or defaults.get("height", dh))
        width = int(width or defaults.get("width", dw))
        steps = int(steps or defaults.get("num_inference_steps", default_steps))
        guidance = float(defaults.get("guidance_scale", default_guidance) if guidance is None else guidance)
        if max_sequence_length is None:
            max_sequence_length = defaults.get("max_sequence_length", self.default_max_sequence_length(pipe))
        if max_sequence_length is not None:
            lo, hi = self.max_sequence_bounds or (1, 1 << 30)
            if not lo <= int(max_sequence_length) <= hi:
                raise ConfigError(
                    f"--max-sequence-length {max_sequence_length}; expected {lo}..{hi} for {self.name}"
                )
            max_sequence_length = int(max_sequence_length)
        if steps <= 0:
            raise ConfigError(f"--steps {steps}; expected a positive number of denoising steps")
        if prompts <= 0 or images_per_prompt <= 0:
            raise ConfigError(f"prompts={prompts}, images_per_prompt={images_per_prompt}; expected positive counts")
        return CallSettings(
            family=self.name, height=height, width=width, steps=steps, guidance=guidance,
            latent_hw=self.latent_hw(pipe, height, width),
            text_tokens=self.text_tokens(pipe, max_sequence_length), max_sequence_length=max_sequence_length,
            prompts=int(prompts), images_per_prompt=int(images_per_prompt), precision=str(precision),
        )

    # ---- one denoiser call ---------------------------------------------------------------
    @abc.abstractmethod
    def geometry(self, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> Any:
        """The family's frozen geometry dataclass of one call (see ``pruning/geometry.py`` for SD3's).

        It must provide ``family``, ``batch``, ``latent_hw``, ``text_tokens``, ``in_channels``,
        ``out_channels``, ``num_tokens``, ``grid``, ``cache_specs(reuse)``, ``fresh_specs(keep, reuse)``,
        ``with_batch``, ``with_text_tokens``, ``step_macs(keep, keep_text, reuse, probe)``,
        ``diffusers_dense_macs()`` (one stock diffusers call, the benchmark's reference), ``to_dict()`` and
        ``as_dynamic()`` (the same shapes with a ``num_tokens`` no K equals, for the dynamic-K graph).
        """

    @abc.abstractmethod
    def geometry_from_dict(self, d: Mapping[str, Any]) -> Any:
        """Inverse of ``geometry.to_dict()`` (manifests store geometries)."""

    @abc.abstractmethod
    def parse_call(self, config: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, DenoiserCall]:
        """(geometry, call) of one denoiser ``forward(*args, **kwargs)`` as the pipeline makes it.

        Raises :class:`~tokprune.errors.ConfigError` for arguments the pruned forward does not support.
        """

    def engine_attributes(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Attributes the family's pipelines read on their denoiser besides ``config``, ``dtype`` and ``device``,
        which the runtime's drop-in (``tokprune.runtime.EngineTransformer``) must carry too. None by default."""
        return {}

    def wrap_output(self, noise: torch.Tensor, return_dict: bool) -> Any:
        """What the denoiser returns for a noise prediction (diffusers' output dataclass or a tuple)."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=noise) if return_dict else (noise,)

    @abc.abstractmethod
    def condition_specs(self, geometry: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        """Bucket inputs besides ``latent`` and ``timestep``: name -> (shape, ``"float"`` or a dtype name).
        ``"float"`` follows the export precision. Names match :attr:`DenoiserCall.conditions`."""

    def call_condition_specs(self, geometry: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        """The conditions of a denoiser call as the pipeline passes them (:meth:`parse_call`'s names).
        Equal to :meth:`condition_specs` unless the family has a per-run :meth:`prompt_stage`."""
        return self.condition_specs(geometry)

    def bucket_caches(self, geometry: Any, *, keep: int, reuse: str, cached: bool = False,
                      ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:  # fmt: skip
        """(caches a bucket reads, fresh tensors it writes), by ``geometry.cache_specs`` name.

        Default (per-block K/V caches, CAT): a pruned bucket (K < N) reads every cache; every bucket writes
        its K fresh rows (:attr:`cache_update` ``"rows"``). Families with step caching override it.
        """
        reads = {} if keep >= geometry.num_tokens else dict(geometry.cache_specs(reuse))
        return reads, dict(geometry.fresh_specs(keep, reuse))

    def prompt_stage(self, model: torch.nn.Module, geometry: Any) -> torch.nn.Module | None:
        """A module computing, once per run, the bucket conditions from the call's (``input_names()`` ->
        ``output_names()``; e.g. PixArt-Σ's cross-attention text K/V), exported as ``prompt_stage.onnx``
        and run by the runtime at the first step of every run. None (default): buckets take the call's
        conditions as they are."""
        return None

    def prepare_conditions(self, model: torch.nn.Module, geometry: Any,
                           conditions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per run, the call's conditions -> the bucket's (:meth:`condition_specs`); identity by default."""
        return dict(conditions)

    @abc.abstractmethod
    def pruned_forward(
        self,
        model: torch.nn.Module,
        geometry: Any,
        *,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        conditions: Mapping[str, torch.Tensor],
        img_idx: torch.Tensor,
        txt_idx: torch.Tensor | None = None,
        caches: dict[str, torch.Tensor] | None = None,
        prev_noise: torch.Tensor | None = None,
        reuse: str = "noise",
        inplace: bool = False,
        record_text: bool = False,
    ) -> Any:
        """One call on the selected image (and text) tokens; returns a
        :class:`tokprune.pruning.forward.StepOutput`. Exact (equals the dense denoiser) when
        ``img_idx`` holds every token; pure when ``inplace=False`` (export traces it)."""

    @abc.abstractmethod
    def tokens(self, noise: torch.Tensor, geometry: Any) -> torch.Tensor:
        """(B, N, C) token view of a (B, C, H, W) noise prediction, in the order ``img_idx`` indexes."""

    # ---- the sampling loop (calibration rollouts) ------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], settings: CallSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(conditions of the CFG batch ``[uncond; cond]`` (or ``cond`` alone without CFG), (B, T) bool
        special-token mask or None), encoded exactly as the pipeline's call encodes them."""
        raise NotImplementedError(f"{self.name}: calibration rollouts are not implemented for this family")

    def prepare_latents(self, pipe: Any, settings: CallSettings, generator: Any, rows: int,
                        dtype: torch.dtype) -> torch.Tensor:
        """Initial latents of ``rows`` images, drawn as the pipeline draws them (``generator``: one or a list)."""
        raise NotImplementedError(f"{self.name}: calibration rollouts are not implemented for this family")

    def timesteps(self, pipe: Any, settings: CallSettings, latents: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(a copy of the pipeline's scheduler with its timesteps set, the timesteps), as the call sets them."""
        raise NotImplementedError(f"{self.name}: calibration rollouts are not implemented for this family")

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser receives for ``latents`` at ``t`` (U-Net schedulers scale it)."""
        return latents

    def guide(self, noise: torch.Tensor, guidance: float | None) -> torch.Tensor:
        """The prediction the scheduler steps with: CFG combination of ``[uncond; cond]`` (and any
        family-specific split, e.g. learned sigma), or ``noise`` as is without CFG."""
        if guidance is None:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + guidance * (cond - uncond)

    def scheduler_step(self, scheduler: Any, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step, as the pipeline's loop makes it."""
        return scheduler.step(noise, t, latents, return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor) -> Any:
        """(P, H, W, 3) float images in [0, 1] as ``output_type="np"`` returns them."""
        raise NotImplementedError(f"{self.name}: decoding is not implemented for this family")

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"


def bind_call(owner: str, params: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{name: value}`` of a denoiser ``forward(*args, **kwargs)`` call by its parameter names
    ``params`` (in order); refuses extra, repeated and unknown arguments naming ``owner``'s forward."""
    if len(args) > len(params):
        raise ConfigError(f"{owner}.forward takes at most {len(params)} arguments, got {len(args)}")
    call = dict(zip(params, args))
    for key in kwargs:
        if key in call:
            raise ConfigError(f"{owner}.forward got {key!r} twice")
        if key not in params:
            raise ConfigError(f"{owner}.forward got an unexpected argument {key!r}")
    call.update(kwargs)
    return call


# ---- registry ---------------------------------------------------------------------------
_REGISTERED: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Register a family by hand (tests, plugins not installed as a package). Installed families are
    found through the ``tokprune.families`` entry-point group without this call."""
    if not isinstance(family, ModelFamily):
        raise ConfigError(f"register_family expects a ModelFamily instance, got {type(family).__name__}")
    if not family.name:
        raise ConfigError(f"{type(family).__name__}.name is empty; set a short name such as 'sd3'")
    if family.name in _REGISTERED and not replace and _REGISTERED[family.name] is not family:
        raise ConfigError(f"a model family named {family.name!r} is already registered; pass replace=True")
    _REGISTERED[family.name] = family
    return family


@functools.lru_cache(maxsize=1)
def _discovered() -> tuple[tuple[str, Any], ...]:
    return tuple(group_entry_points(ENTRY_POINT_GROUP).items())


def group_entry_points(group: str) -> dict[str, Any]:
    """Entry points of ``group`` across every installed distribution, by name (the first one wins).

    ``importlib.metadata.entry_points(group=...)`` keeps one distribution per name, so a stale
    ``tokprune.egg-info`` in the working directory (a build left it) would hide the installed
    package's newer table; the union over all distributions does not.
    """
    from importlib.metadata import distributions

    found: dict[str, Any] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == group:
                found.setdefault(ep.name, ep)
    return found


def _load_entry_points() -> None:
    for name, ep in _discovered():
        if name in _REGISTERED:
            continue
        family = ep.load()
        if not isinstance(family, ModelFamily):
            raise ConfigError(f"entry point {ENTRY_POINT_GROUP}:{name} = {ep.value} is not a ModelFamily instance")
        _REGISTERED.setdefault(family.name, family)


def all_families() -> dict[str, ModelFamily]:
    """Every registered family by name (installed entry points and :func:`register_family`)."""
    _load_entry_points()
    if not _REGISTERED:
        raise ConfigError(
            f"no model family is registered: the {ENTRY_POINT_GROUP!r} entry points are missing. "
            "Install the package (`pip install -e .`) so its entry points are recorded"
        )
    return dict(sorted(_REGISTERED.items()))


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``sd3``, ``pixart-sigma``, ``sd-unet``)."""
    if isinstance(name, ModelFamily):
        return name
    families = all_families()
    if name not in families:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]


def family_for(obj: Any) -> ModelFamily:
    """The family owning ``obj``: a pipeline, a denoiser module, or a geometry (its ``family`` field)."""
    name = getattr(obj, "family", None)
    if isinstance(name, str) and not isinstance(obj, torch.nn.Module):
        return get_family(name)
    families = all_families()
    for family in families.values():
        if family.owns(obj):
            return family
    raise ConfigError(
        f"no model family prunes a {type(obj).__name__}; supported: "
        + "; ".join(f"{f.name} ({', '.join(f.pipeline_classes + f.denoiser_classes)})" for f in families.values())
    )
