"""SD1.5 / SDXL U-Nets as a :class:`~tokprune.pruning.family.ModelFamily` (``sd-unet``)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from tokprune.errors import ConfigError
from tokprune.families.unet.forward import call_conditions, noise_tokens, unet_forward
from tokprune.families.unet.geometry import UNetGeometry
from tokprune.pruning.family import CallSettings, DenoiserCall, ModelFamily


class UNetFamily(ModelFamily):
    """``UNet2DConditionModel`` in ``StableDiffusionPipeline`` (SD1.5) and ``StableDiffusionXLPipeline`` (SDXL)."""

    name = "sd-unet"
    denoiser_attr = "unet"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    denoiser_classes = ("UNet2DConditionModel",)
    max_sequence_bounds = None

    @property
    def aliases(self) -> Mapping[str, str]:  # type: ignore[override]
        from tokprune.families.unet.models import ALIASES

        return dict(ALIASES)

    def builtins(self) -> Mapping[str, tuple[Any, str]]:
        from tokprune.families.unet.models import BUILTINS, DESCRIPTIONS

        return {name: (fn, DESCRIPTIONS[name]) for name, fn in BUILTINS.items()}

    default_policy = "dynamics"  # DaTo: dynamics scores, one base token per 2x2 window always kept
    outputs_all_tokens = True  # pruned tokens are restored within the step: no prev_noise input in buckets
    step_caching = True  # DeepCache steps (PrunePlan.step_cache): '-cached' buckets, a calibration knob
    cache_update = "whole"  # a full step's fresh.deep replaces the whole deep feature (copy, not a row scatter)
    dynamic_graph = False  # full and cached buckets have different I/O: one static graph per bucket

    def bucket_caches(self, geometry: UNetGeometry, *, keep: int, reuse: str, cached: bool = False,
                      ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:  # fmt: skip
        """A cached step reads the deep feature and writes nothing; a full step (any K) reads nothing and
        writes the whole deep feature."""
        if cached:
            return dict(geometry.cache_specs(reuse)), {}
        return {}, dict(geometry.fresh_specs(keep, reuse))

    def bind_pipeline(self, pipe: Any, pruner: Any) -> None:
        """Hand each call's CLIP BOS/EOS mask to ``pruner`` (the generic wrapper, the U-Net's mask)."""
        from tokprune.families.unet.text import call_mask
        from tokprune.pruning.text import install_text_protect

        install_text_protect(pipe, lambda mask: setattr(pruner, "call_text_protect", mask), mask_of=call_mask)

    # ---- call settings -------------------------------------------------------------------
    def text_tokens(self, pipe: Any, max_sequence_length: int | None) -> int:
        """CLIP rows (77): SD pipelines pad every prompt to the tokenizer's length."""
        if max_sequence_length is not None:
            raise ConfigError("--max-sequence-length does not apply to SD1.5/SDXL (CLIP text is always 77 tokens); drop it")
        return int(pipe.tokenizer.model_max_length)

    def default_size(self, pipe: Any) -> tuple[int, int]:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return size, size

    # ---- one denoiser call ---------------------------------------------------------------
    def geometry(self, config: Any, *, batch: int, latent_hw: tuple[int, int], text_tokens: int) -> UNetGeometry:
        return UNetGeometry.from_config(config, batch=batch, latent_hw=latent_hw, text_tokens=text_tokens)

    def geometry_from_dict(self, d: Mapping[str, Any]) -> UNetGeometry:
        return UNetGeometry.from_dict(dict(d))

    def parse_call(self, config: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[UNetGeometry, DenoiserCall]:
        call = call_conditions(args, kwargs)
        s, e = call["sample"], call["encoder_hidden_states"]
        g = self.geometry(config, batch=s.shape[0], latent_hw=tuple(s.shape[-2:]), text_tokens=e.shape[1])
        conditions = {"encoder_hidden_states": e}
        if g.pooled_dim:
            if call["text_embeds"] is None or call["time_ids"] is None:
                raise ConfigError("this SDXL U-Net needs added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}")
            conditions["text_embeds"] = call["text_embeds"]
            conditions["time_ids"] = call["time_ids"]
        return g, DenoiserCall(s, call["timestep"], conditions, bool(call["return_dict"]))

    def engine_attributes(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """SDXL's pipeline checks its time ids against ``unet.add_embedding.linear_1.in_features``."""
        from types import SimpleNamespace

        if config.get("addition_embed_type") != "text_time":
            return {}
        width = int(config["projection_class_embeddings_input_dim"])
        return {"add_embedding": SimpleNamespace(linear_1=SimpleNamespace(in_features=width))}

    def wrap_output(self, noise: torch.Tensor, return_dict: bool) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def condition_specs(self, geometry: UNetGeometry) -> dict[str, tuple[tuple[int, ...], str]]:
        return geometry.condition_specs()

    def pruned_forward(self, model: torch.nn.Module, geometry: UNetGeometry, *, latent: torch.Tensor,
                       timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor], img_idx: torch.Tensor,
                       txt_idx: torch.Tensor | None = None, caches: dict[str, torch.Tensor] | None = None,
                       prev_noise: torch.Tensor | None = None, reuse: str = "noise", inplace: bool = False,
                       record_text: bool = False, cached: bool = False) -> Any:  # fmt: skip
        """The pruned U-Net step. ``prev_noise`` and ``reuse`` are unused (DaTo restores pruned tokens within
        the step); ``cached=True`` runs a DeepCache step from ``caches['deep']``."""
        if img_idx is not None and img_idx.shape[1] == geometry.num_tokens:
            img_idx = None  # keep-all: the dense step (the generic sampler passes every index)
        return unet_forward(
            model, geometry, sample=latent, timestep=timestep, encoder_hidden_states=conditions["encoder_hidden_states"],
            text_embeds=conditions.get("text_embeds"), time_ids=conditions.get("time_ids"), img_idx=img_idx,
            txt_idx=txt_idx, caches=caches, step_kind="cached" if cached else "full", inplace=inplace,
            record_text=record_text,
        )  # fmt: skip

    def tokens(self, noise: torch.Tensor, geometry: UNetGeometry) -> torch.Tensor:
        return noise_tokens(noise, geometry)

    # ---- the sampling loop -------------------------------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], settings: CallSettings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from tokprune.families.unet.text import special_token_mask

        device = _device(pipe)
        xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
        mask = special_token_mask(pipe, prompts)
        if not xl:
            pos, neg = pipe.encode_prompt(prompts, device, 1, settings.cfg, None)
            if not settings.cfg:
                return {"encoder_hidden_states": pos}, mask
            neg_mask = special_token_mask(pipe, [""] * len(prompts))
            return {"encoder_hidden_states": torch.cat([neg, pos])}, torch.cat([neg_mask, mask])
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=settings.cfg
        )
        size = (settings.height, settings.width)
        proj = int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype, text_encoder_projection_dim=proj).to(device)
        ids = ids.repeat(len(prompts), 1)
        if not settings.cfg:
            return {"encoder_hidden_states": pos, "text_embeds": pooled, "time_ids": ids}, mask
        neg_mask = torch.zeros_like(mask) if pipe.config.force_zeros_for_empty_prompt else special_token_mask(pipe, [""] * len(prompts))
        conditions = {"encoder_hidden_states": torch.cat([neg, pos]), "text_embeds": torch.cat([neg_pooled, pooled]),
                      "time_ids": torch.cat([ids, ids])}  # fmt: skip
        return conditions, torch.cat([neg_mask, mask])

    def timesteps(self, pipe: Any, settings: CallSettings, latents: torch.Tensor) -> tuple[Any, torch.Tensor]:
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(settings.steps, device=latents.device)
        return sched, sched.timesteps

    def prepare_latents(self, pipe: Any, settings: CallSettings, generator: Any, rows: int,
                        dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        """Drawn as the pipeline draws them, scaled by the initial sigma of a scheduler set up for this run."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = settings.latent_hw
        shape = (rows, int(pipe.unet.config.in_channels), h, w)
        latents = randn_tensor(shape, generator=generator, device=_device(pipe), dtype=dtype)
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(settings.steps, device=latents.device)
        return latents * sched.init_noise_sigma

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def scheduler_step(self, scheduler: Any, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
        return scheduler.step(noise, t, latents, **kwargs, return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor) -> Any:
        vae = pipe.vae
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        x = latents.to(vae.dtype)
        if mean is not None and std is not None:
            m = torch.tensor(mean).view(1, -1, 1, 1).to(x)
            s = torch.tensor(std).view(1, -1, 1, 1).to(x)
            x = x * s / cfg.scaling_factor + m
        else:
            x = x / cfg.scaling_factor
        image = vae.decode(x, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")


def _device(pipe: Any) -> torch.device:
    return pipe._execution_device if hasattr(pipe, "_execution_device") else torch.device("cpu")
