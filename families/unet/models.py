"""Stable Diffusion U-Net pipelines: offline tiny / medium builders and the hub aliases.

Three offline, seeded pipelines built from configs (nothing downloaded, global RNG untouched):

- ``sd15-tiny``: a complete ``StableDiffusionPipeline`` (2-level U-Net, 32 wide, cross-attention at
  the latent resolution as in SD1.5; one CLIP text encoder; a 2-level VAE; DDIM). 64x64 px images
  from a 32x32 latent: N = 1024 tokens at the pruned level, T = 77 text tokens.
- ``sdxl-tiny``: a complete ``StableDiffusionXLPipeline`` (no attention at the top level, as SDXL:
  the pruned level is the 2x-downsampled one; two CLIP encoders whose hidden states are concatenated;
  pooled text and the six time ids through ``add_embedding``). 64x64 px, N = 256, T = 77.
- ``sd15-medium``: the SD1.5 U-Net layout (4 levels, attention at the first three, 2 resnets per
  down level, 3 per up level) at a CPU-friendly width (64/128/256/256, 2 heads), 64x64 latent
  (512 px image like SD1.5: N = 4096 tokens at the pruned level). Random weights: speed only.

Hub aliases (real weights; the user's download): ``sd1.5`` and ``sdxl`` (:data:`ALIASES`). Offline and
uncached they fail with the same :class:`~tokprune.errors.ModelNotFoundError` path as ``sd3``.

Example::

    from tokprune.families.unet.models import build_pipeline
    pipe = build_pipeline("sd15-tiny")
    image = pipe("a red circle", num_inference_steps=4, output_type="np").images[0]   # (64, 64, 3)
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from tokprune.errors import ConfigError

logger = logging.getLogger(__name__)

#: ``--model`` alias -> hub id of the real checkpoints.
ALIASES: dict[str, str] = {
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

_SD15_TINY_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 64), "norm_num_groups": 8, "cross_attention_dim": 32,
    "attention_head_dim": 8,  # SD1.5 naming: this is the number of heads
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip
_SDXL_TINY_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 64), "norm_num_groups": 8, "cross_attention_dim": 64,  # 32 + 32 (two encoders)
    "attention_head_dim": (2, 4), "use_linear_projection": True, "transformer_layers_per_block": (1, 2),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text (projection 32) + 6 time ids x 8
}  # fmt: skip
_SD15_MEDIUM_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (64, 128, 256, 256), "norm_num_groups": 32, "cross_attention_dim": 128,
    "attention_head_dim": 2,  # heads; head dims 32 / 64 / 128 (SD1.5: 40 / 80 / 160); 8 heads of 8 would
    # make CPU attention memory-bound and flatter pruning's speed-up far beyond its MAC saving
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip

VARIANTS: dict[str, dict[str, Any]] = {"sd15-tiny": _SD15_TINY_UNET, "sdxl-tiny": _SDXL_TINY_UNET, "sd15-medium": _SD15_MEDIUM_UNET}


def unet_config(variant: str, **overrides: Any) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of a built-in variant, with ``overrides`` applied.

    >>> unet_config("sd15-tiny")["block_out_channels"]
    (32, 64)
    """
    if variant not in VARIANTS:
        raise ConfigError(f"U-Net variant {variant!r} is unknown; expected one of {sorted(VARIANTS)}")
    cfg = dict(VARIANTS[variant])
    unknown = sorted(k for k in overrides if k not in cfg and k not in _EXTRA_UNET_KEYS)
    if unknown:
        raise ConfigError(f"unet_config({variant!r}): unknown override(s) {unknown}; expected UNet2DConditionModel keys")
    cfg.update(overrides)
    return cfg


_EXTRA_UNET_KEYS = frozenset({"transformer_layers_per_block", "use_linear_projection", "upcast_attention"})


def build_unet(variant: str = "sd15-tiny", *, seed: int = 0, **overrides: Any):
    """A random ``UNet2DConditionModel`` of a built-in variant, eval mode, float32, CPU; seeded."""
    from diffusers import UNet2DConditionModel

    cfg = unet_config(variant, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**cfg)
    return model.eval()


def _clip_encoder(tokenizer: Any, hidden: int, *, projection: bool, seed: int, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, hidden_act="gelu",
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 8), max_position_embeddings=77,
        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def _vae(levels: int, seed: int, *, scaling: float):
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {
        "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": (8,) + (16,) * (levels - 1), "scaling_factor": scaling,
    }  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**kwargs).eval()


def _sd15_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip


def build_pipeline(variant: str = "sd15-tiny", *, seed: int = 0):
    """A complete offline pipeline: ``StableDiffusionPipeline`` (``sd15-*``) or ``StableDiffusionXLPipeline``.

    Same weights on every machine for a ``seed`` (and torch version); eval mode, float32, CPU, no
    safety checker, progress bar off. Tokenizers are built in memory (CLIP byte-level BPE, BOS = 0,
    EOS = 1 = padding, 77 positions), as :mod:`tokprune.tiny` builds them for SD3.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from tokprune.tiny import _tiny_clip_tokenizer

    unet = build_unet(variant, seed=seed)
    tokenizer = _tiny_clip_tokenizer()
    if variant.startswith("sdxl"):
        enc_1 = _clip_encoder(tokenizer, 32, projection=False, seed=seed + 1)
        tokenizer_2 = _tiny_clip_tokenizer()
        enc_2 = _clip_encoder(tokenizer_2, 32, projection=True, seed=seed + 2)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(2, seed + 3, scaling=0.13025), text_encoder=enc_1, text_encoder_2=enc_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet,
            scheduler=EulerDiscreteScheduler(
                num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading",
            ),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )  # fmt: skip
    else:
        levels = 4 if variant == "sd15-medium" else 2  # VAE scale 8 (512 px) / 2 (64 px)
        hidden = int(unet.config.cross_attention_dim)
        pipe = StableDiffusionPipeline(
            vae=_vae(levels, seed + 3, scaling=0.18215), text_encoder=_clip_encoder(tokenizer, hidden, projection=False, seed=seed + 1),
            tokenizer=tokenizer, unet=unet, scheduler=_sd15_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILTINS: dict[str, Callable[[], Any]] = {name: functools.partial(build_pipeline, name) for name in VARIANTS}
DESCRIPTIONS: dict[str, str] = {
    "sd15-tiny": "offline tiny SD1.5 U-Net pipeline (N=1024 at the pruned level, T=77)",
    "sdxl-tiny": "offline tiny SDXL U-Net pipeline (two CLIP encoders, time ids; N=256, T=77)",
    "sd15-medium": "offline random SD1.5-layout U-Net at CPU width (512 px, N=4096); speed only",
}


def load_pipeline(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load an SD1.5 / SDXL pipeline: a built-in, an alias (``sd1.5``, ``sdxl``), a hub id or a local directory.

    The one generic loader (:func:`tokprune.models.load_pipeline`) does the work once this family is
    registered: hub ids load from the HF cache and download only when the hub answers; offline and
    uncached it raises :class:`~tokprune.errors.ModelNotFoundError` within seconds, naming the fix.
    """
    from tokprune import models as _m

    return _m.load_pipeline(name_or_path, dtype=dtype, device=device)
