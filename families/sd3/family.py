"""SD3 / SD3.5 as a :class:`~tokprune.pruning.family.ModelFamily`."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokprune.errors import ConfigError
from tokprune.pruning.family import CallSettings, DenoiserCall, ModelFamily, bind_call
from tokprune.pruning.forward import patchify, pruned_forward
from tokprune.pruning.geometry import Geometry

logger = logging.getLogger(__name__)

#: SD3Transformer2DModel.forward's parameters, in order (positional calls are mapped by this).
_FORWARD_PARAMS = (
    "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "block_controlnet_hidden_states",
    "joint_attention_kwargs", "return_dict", "skip_layers",
)


class SD3Family(ModelFamily):
    """SD3-medium, SD3.5-medium / large and their tiny offline twins."""

    name = "sd3"
    denoiser_attr = "transformer"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_classes = ("SD3Transformer2DModel",)
    aliases = {
        "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
        "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
        "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    }
    max_sequence_bounds = (1, 512)  # T5 limit

    # ---- resolution and loading ----------------------------------------------------------
    def builtins(self) -> Mapping[str, tuple[Any, str]]:
        from tokprune.tiny import build_tiny_pipeline

        return {
            "sd3-tiny": (functools.partial(build_tiny_pipeline, "sd3"), "offline tiny SD3 (N=256, T=333)"),
            "sd3.5-tiny": (functools.partial(build_tiny_pipeline, "sd3.5"), "offline tiny SD3.5 (qk-norm, dual)"),
        }

    # ---- call settings -------------------------------------------------------------------
    def text_tokens(self, pipe: Any, max_sequence_length: int | None) -> int:
        """CLIP rows (77) + T5 rows (``max_sequence_length``)."""
        clip = int(getattr(pipe, "tokenizer_max_length", 0) or pipe.tokenizer.model_max_length)
        return clip + int(256 if max_sequence_length is None else max_sequence_length)

    def max_sequence_length_for(self, pipe: Any, text_tokens: int) -> int:
        return int(text_tokens) - self.text_tokens(pipe, 0)

    def default_max_sequence_length(self, pipe: Any) -> int:
        return 256  # StableDiffusion3Pipeline.__call__'s default

    # ---- one denoiser call ---------------------------------------------------------------
    def geometry(self, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> Geometry:
        return Geometry.from_config(config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)

    def geometry_from_dict(self, d: Mapping[str, Any]) -> Geometry:
        return Geometry.from_dict(d)

    def parse_call(self, config: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Geometry, DenoiserCall]:
        call = bind_call("SD3Transformer2DModel", _FORWARD_PARAMS, args, kwargs)
        if call.get("block_controlnet_hidden_states") is not None or call.get("skip_layers") is not None or call.get(
            "joint_attention_kwargs"
        ):
            raise ConfigError(
                "tokprune's pruned forward does not support ControlNet residuals, skip_layers or "
                "joint_attention_kwargs (IP-Adapter, LoRA scale); call tokprune.pruning.remove(...) first"
            )
        latent = call["hidden_states"]
        ctx = call.get("encoder_hidden_states")
        pooled = call.get("pooled_projections")
        if ctx is None or pooled is None or call.get("timestep") is None:
            raise ConfigError("the pruned SD3 forward needs encoder_hidden_states, pooled_projections and timestep")
        geometry = self.geometry(
            config, batch=latent.shape[0], latent_hw=tuple(latent.shape[-2:]), text_tokens=ctx.shape[1]
        )
        conditions = {"encoder_hidden_states": ctx, "pooled_projections": pooled}
        return geometry, DenoiserCall(latent, call["timestep"], conditions, bool(call.get("return_dict", True)))

    def condition_specs(self, geometry: Geometry) -> dict[str, tuple[tuple[int, ...], str]]:
        g = geometry
        return {
            "encoder_hidden_states": ((g.batch, g.text_tokens, g.joint_attention_dim), "float"),
            "pooled_projections": ((g.batch, g.pooled_dim), "float"),
        }

    def pruned_forward(self, model: torch.nn.Module, geometry: Geometry, *, latent: torch.Tensor,
                       timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
        return pruned_forward(
            model, geometry, latent=latent, timestep=timestep,
            encoder_hidden_states=conditions["encoder_hidden_states"],
            pooled_projections=conditions["pooled_projections"], **kwargs,
        )

    def tokens(self, noise: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        return patchify(noise, geometry.patch)

    # ---- the sampling loop ---------------------------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], settings: CallSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from tokprune.pruning.text import special_token_mask

        msl = int(settings.max_sequence_length or self.default_max_sequence_length(pipe))
        with quiet_truncation(pipe, prompts, msl):
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=_device(pipe), num_images_per_prompt=1,
                do_classifier_free_guidance=settings.cfg, max_sequence_length=msl,
            )
        mask = special_token_mask(pipe, prompts, max_sequence_length=msl)
        if not settings.cfg:
            return {"encoder_hidden_states": pos, "pooled_projections": pooled}, mask
        neg_mask = special_token_mask(pipe, [""] * len(prompts), max_sequence_length=msl)
        conditions = {"encoder_hidden_states": torch.cat([neg, pos]), "pooled_projections": torch.cat([neg_pooled, pooled])}
        return conditions, torch.cat([neg_mask, mask])

    def prepare_latents(self, pipe: Any, settings: CallSettings, generator: Any, rows: int,
                        dtype: torch.dtype) -> torch.Tensor:
        denoiser = self.denoiser(pipe)
        return pipe.prepare_latents(
            rows, denoiser.config.in_channels, settings.height, settings.width, dtype, _device(pipe), generator, None
        )

    def timesteps(self, pipe: Any, settings: CallSettings, latents: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(scheduler with its timesteps set, timesteps) exactly as the pipeline's call sets them."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(pipe.scheduler)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            _, _, h, w = latents.shape
            p = self.denoiser(pipe).config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // p) * (w // p),
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(sched, settings.steps, _device(pipe), **kwargs)
        return sched, timesteps

    def decode(self, pipe: Any, latents: torch.Tensor) -> Any:
        """(P, H, W, 3) float images in [0, 1] as ``output_type="np"`` returns them."""
        vae = pipe.vae
        x = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")


def _device(pipe: Any) -> torch.device:
    return pipe._execution_device if hasattr(pipe, "_execution_device") else torch.device("cpu")


@contextlib.contextmanager
def quiet_truncation(pipe: Any, prompts: Sequence[str], max_sequence_length: int):
    """Encode without diffusers' per-prompt truncation warnings; one counted note instead.

    Prompts are truncated exactly as the pipeline truncates them (CLIP: 77 tokens, T5:
    ``max_sequence_length``); only the noise goes.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    counts = []
    for tok, limit in ((getattr(pipe, "tokenizer", None), None), (getattr(pipe, "tokenizer_3", None), max_sequence_length)):
        if tok is None:
            continue
        limit = limit or int(tok.model_max_length)
        with _silenced(tlog):
            lengths = [len(ids) for ids in tok(list(prompts), add_special_tokens=True).input_ids]
        counts.append(sum(n > limit for n in lengths))
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
    if counts and max(counts):
        logger.info("%d of %d prompts are longer than the text encoders take and were truncated, as the "
                    "pipeline truncates them", max(counts), len(prompts))


@contextlib.contextmanager
def _silenced(tlog: Any):
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
