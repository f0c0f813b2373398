"""PixArt-Σ as a :class:`~tokprune.pruning.family.ModelFamily` (``PixArtTransformer2DModel`` in ``PixArtSigmaPipeline``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any

import torch

from tokprune.errors import ConfigError
from tokprune.families.pixart.geometry import FAMILY_NAME, MAX_TEXT_TOKENS, PixArtGeometry
from tokprune.families.pixart.models import ALIASES
from tokprune.pruning.family import CallSettings, DenoiserCall, ModelFamily, bind_call
from tokprune.pruning.forward import patchify

#: PixArtTransformer2DModel.forward's parameters, in order (positional calls are mapped by this).
_FORWARD_PARAMS = (
    "hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs", "cross_attention_kwargs",
    "attention_mask", "encoder_attention_mask", "return_dict",
)  # fmt: skip
_DEFAULT_GUIDANCE = 4.5  # PixArtSigmaPipeline.__call__'s default guidance_scale


class PixArtFamily(ModelFamily):
    """PixArt-Σ (and its offline ``pixart-tiny`` / ``pixart-medium`` twins)."""

    name = FAMILY_NAME
    denoiser_attr = "transformer"
    pipeline_classes = ("PixArtSigmaPipeline",)
    denoiser_classes = ("PixArtTransformer2DModel",)
    aliases = ALIASES
    max_sequence_bounds = (1, MAX_TEXT_TOKENS)
    #: Geometries this family builds take the per-prompt text K/V as bucket inputs (True) or the prompt's
    #: embeddings (False: each bucket call recomputes the text stage). True needs the generic runtime to
    #: run :meth:`prepare_conditions` once per run; see families/pixart/README.md.
    text_kv_inputs = True

    # ---- resolution and loading ----------------------------------------------------------
    def builtins(self) -> Mapping[str, tuple[Any, str]]:
        from tokprune.families.pixart import models

        return {
            "pixart-tiny": (models.build_tiny_pipeline, "offline tiny PixArt-Σ (N=256, T=300)"),
            "pixart-medium": (models.build_medium_pipeline, "offline PixArt-Σ architecture for CPU speed (6 blocks, D=384, N=1024)"),
        }  # fmt: skip

    # ---- call settings -------------------------------------------------------------------
    def call_defaults(self, pipe: Any) -> dict[str, Any]:
        return {"guidance_scale": _DEFAULT_GUIDANCE, **super().call_defaults(pipe)}

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = int(self.denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)
        return size, size

    def text_tokens(self, pipe: Any, max_sequence_length: int | None) -> int:
        """T5 rows: ``max_sequence_length`` (padding included; padded rows are masked)."""
        return int(MAX_TEXT_TOKENS if max_sequence_length is None else max_sequence_length)

    def default_max_sequence_length(self, pipe: Any) -> int:
        return MAX_TEXT_TOKENS

    def max_sequence_length_for(self, pipe: Any, text_tokens: int) -> int:
        return int(text_tokens)

    def binned(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """The size the pipeline renders with its default ``use_resolution_binning=True`` (the size asked for
        when the model's call defaults say ``use_resolution_binning=False``, as ``pixart-shapes``'s do)."""
        from tokprune.families.pixart.models import binned_size

        if self.call_defaults(pipe).get("use_resolution_binning", True) is False:
            return int(height), int(width)
        return binned_size(int(self.denoiser(pipe).config.sample_size), height, width)

    def settings(self, pipe: Any, *, height: int | None = None, width: int | None = None, **kwargs: Any) -> CallSettings:
        """As the base, with the size snapped to the pipeline's resolution bin: engines are exported for
        the size the transformer actually sees (``use_resolution_binning=True``, the pipeline's default)."""
        defaults = self.call_defaults(pipe)
        dh, dw = self.default_size(pipe)
        h = int(height or defaults.get("height", dh))
        w = int(width or defaults.get("width", dw))
        bh, bw = self.binned(pipe, h, w)
        kwargs.setdefault("default_guidance", _DEFAULT_GUIDANCE)
        return super().settings(pipe, height=bh, width=bw, **kwargs)

    # ---- one denoiser call ---------------------------------------------------------------
    def geometry(self, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> PixArtGeometry:
        g = PixArtGeometry.from_config(config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)
        return g if g.text_kv_inputs == self.text_kv_inputs else _replace(g, text_kv_inputs=self.text_kv_inputs)

    def geometry_from_dict(self, d: Mapping[str, Any]) -> PixArtGeometry:
        return PixArtGeometry.from_dict(d)

    def parse_call(self, config: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[PixArtGeometry, DenoiserCall]:
        call = bind_call("PixArtTransformer2DModel", _FORWARD_PARAMS, args, kwargs)
        if call.get("cross_attention_kwargs") or call.get("attention_mask") is not None:
            raise ConfigError(
                "tokprune's pruned PixArt forward does not support cross_attention_kwargs or a self-attention "
                "attention_mask; call tokprune.pruning.remove(...) first"
            )
        latent, ctx, t = call["hidden_states"], call.get("encoder_hidden_states"), call.get("timestep")
        if ctx is None or t is None:
            raise ConfigError("the pruned PixArt forward needs encoder_hidden_states and timestep")
        b, n_text = ctx.shape[0], ctx.shape[1]
        mask = call.get("encoder_attention_mask")
        if mask is None:
            mask = torch.ones(b, n_text, dtype=torch.int64, device=ctx.device)
        elif mask.dim() != 2:
            raise ConfigError(
                f"encoder_attention_mask has shape {tuple(mask.shape)}; the pruned PixArt forward takes the (B, T) "
                "keep-mask the pipeline passes (1 keep, 0 padding)"
            )
        geometry = self.geometry(config, batch=b, latent_hw=tuple(latent.shape[-2:]), text_tokens=n_text)
        conditions = {"encoder_hidden_states": ctx, "encoder_attention_mask": mask.to(torch.int64)}
        if geometry.additional_conditions:
            extra = call.get("added_cond_kwargs") or {}
            if extra.get("resolution") is None or extra.get("aspect_ratio") is None:
                raise ConfigError("this PixArt model needs added_cond_kwargs resolution and aspect_ratio")
            conditions["resolution"], conditions["aspect_ratio"] = extra["resolution"], extra["aspect_ratio"]
        if t.dim() == 0:
            t = t.expand(b)
        return geometry, DenoiserCall(latent, t, conditions, bool(call.get("return_dict", True)))

    def call_condition_specs(self, geometry: PixArtGeometry) -> dict[str, tuple[tuple[int, ...], str]]:
        """What :meth:`parse_call` puts in ``DenoiserCall.conditions`` (the prompt stage's inputs)."""
        g = geometry
        specs = {
            "encoder_hidden_states": ((g.batch, g.text_tokens, g.caption_channels), "float"),
            "encoder_attention_mask": ((g.batch, g.text_tokens), "int64"),
        }
        if g.additional_conditions:
            specs["resolution"] = ((g.batch, 2), "float")
            specs["aspect_ratio"] = ((g.batch, 1), "float")
        return specs

    def condition_specs(self, geometry: PixArtGeometry) -> dict[str, tuple[tuple[int, ...], str]]:
        """Bucket inputs besides latent/timestep: the call's conditions, or (``text_kv_inputs``) the per-prompt
        text K/V and mask bias of :meth:`prepare_conditions`."""
        g = geometry
        if not g.text_kv_inputs:
            return self.call_condition_specs(g)
        specs = {name: (shape, "float") for name, shape in g.text_specs().items()}
        if g.additional_conditions:
            specs["resolution"] = ((g.batch, 2), "float")
            specs["aspect_ratio"] = ((g.batch, 1), "float")
        return specs

    def prepare_conditions(self, model: torch.nn.Module, geometry: PixArtGeometry,
                           conditions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-run: the call's conditions -> the bucket's (:meth:`condition_specs`). Identity unless
        ``text_kv_inputs``; then the text stage (caption projection, every block's text K/V, mask bias)."""
        if not geometry.text_kv_inputs:
            return dict(conditions)
        from tokprune.families.pixart.forward import text_conditions

        out = text_conditions(model, geometry, conditions["encoder_hidden_states"], conditions.get("encoder_attention_mask"))
        for key in ("resolution", "aspect_ratio"):
            if key in conditions:
                out[key] = conditions[key]
        return out

    def prompt_stage(self, model: torch.nn.Module, geometry: PixArtGeometry) -> torch.nn.Module:
        """A module ``forward(*call conditions) -> tuple(text stage)`` to export as a per-run graph (None when
        the buckets take the call's conditions, ``text_kv_inputs`` off)."""
        from tokprune.families.pixart.forward import PromptStage

        if not geometry.text_kv_inputs:
            return None

        return PromptStage(model, geometry)

    def pruned_forward(self, model: torch.nn.Module, geometry: PixArtGeometry, *, latent: torch.Tensor,
                       timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
        from tokprune.families.pixart.forward import pruned_forward

        return pruned_forward(model, geometry, latent=latent, timestep=timestep, conditions=dict(conditions), **kwargs)

    def tokens(self, noise: torch.Tensor, geometry: PixArtGeometry) -> torch.Tensor:
        """(B, N, p²·C) of the noise channels only (learned sigma's variance channels are not a selection signal)."""
        if geometry.learned_sigma:
            noise = noise[:, : geometry.in_channels]
        return patchify(noise, geometry.patch)

    def text_protect(self, conditions: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: T5's EOS of every row, the last unmasked position, which text pruning must keep."""
        from tokprune.families.pixart.pipeline_hooks import eos_mask

        return eos_mask(conditions["encoder_attention_mask"])

    def bind_pipeline(self, pipe: Any, pruner: Any) -> None:
        """Make ``pipe`` report each call's CFG scale (``pipe.guidance_scale`` / ``do_classifier_free_guidance``,
        which the sampler reads) and hand its T5 EOS mask to ``pruner.call_text_protect`` (instead of the
        base class's SD3 tokenizer-based protection, which finds nothing on a T5-only pipeline)."""
        from tokprune.families.pixart import pipeline_hooks

        pipeline_hooks.bind(pipe, lambda mask: setattr(pruner, "call_text_protect", mask))

    def unbind_pipeline(self, pipe: Any) -> None:
        """Undo :meth:`bind_pipeline`: the pipeline's class and attributes are the original ones."""
        from tokprune.families.pixart import pipeline_hooks

        pipeline_hooks.unbind(pipe)

    # ---- the sampling loop ---------------------------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], settings: CallSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Conditions of ``[uncond; cond]`` exactly as ``PixArtSigmaPipeline.__call__`` builds them (negative
        prompt "", its default clean_caption=True), and the EOS mask :meth:`text_protect`."""
        msl = int(settings.max_sequence_length or MAX_TEXT_TOKENS)
        with _quiet():
            pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
                prompts, settings.cfg, negative_prompt="", num_images_per_prompt=1, device=_device(pipe),
                clean_caption=True, max_sequence_length=msl,
            )
        if settings.cfg:
            pos, pos_mask = torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])
        conditions = {"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask.to(torch.int64)}
        return conditions, self.text_protect(conditions)

    def prepare_latents(self, pipe: Any, settings: CallSettings, generator: Any, rows: int,
                        dtype: torch.dtype) -> torch.Tensor:
        denoiser = self.denoiser(pipe)
        return pipe.prepare_latents(
            rows, denoiser.config.in_channels, settings.height, settings.width, dtype, _device(pipe), generator, None
        )

    def timesteps(self, pipe: Any, settings: CallSettings, latents: torch.Tensor) -> tuple[Any, torch.Tensor]:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

        sched = copy.deepcopy(pipe.scheduler)
        timesteps, _ = retrieve_timesteps(sched, settings.steps, _device(pipe))
        return sched, timesteps

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def scheduler_step(self, scheduler: Any, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Learned sigma: the scheduler steps with the noise channels only, as the pipeline's loop."""
        if noise.shape[1] == 2 * latents.shape[1]:
            noise = noise.chunk(2, dim=1)[0]
        return scheduler.step(noise, t, latents, return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor) -> Any:
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")


def _replace(g: PixArtGeometry, **changes: Any) -> PixArtGeometry:
    from dataclasses import replace

    return replace(g, **changes)


def _device(pipe: Any) -> torch.device:
    return pipe._execution_device if hasattr(pipe, "_execution_device") else torch.device("cpu")


@contextlib.contextmanager
def _quiet():
    """Encode without diffusers' clean_caption fallback notices and truncation warnings (the text is
    processed exactly as the pipeline processes it; only the noise goes)."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


__all__ = ["PixArtFamily"]
