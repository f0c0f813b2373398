"""PixArt-Σ pipelines: offline ``pixart-tiny`` / ``pixart-medium`` builders and the ``pixart-sigma`` hub alias.

- ``pixart-tiny``: a complete random ``PixArtSigmaPipeline`` built from configs in about a second
  (tests): 2 blocks of width 32, a 2-layer T5 encoder with a tokenizer built in memory, a 4-level
  VAE (scale factor 8, like the real one) and the Σ scheduler (DPM-Solver++ 2M). Default call:
  256 px -> 32x32 latent -> **N = 256** image tokens, **T = 300** T5 tokens (``max_sequence_length``).
- ``pixart-medium``: the same pipeline with a PixArt-architecture transformer sized for CPU speed
  measurements: 6 blocks, width 384 (6 heads x 64), ``sample_size`` 64: 512 px -> **N = 1024**.
- ``pixart-sigma``: ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` (28 blocks, width 1152, 1024 px ->
  N = 4096), an alias :func:`tokprune.models.load_pipeline` resolves through the family: loaded from
  the local Hugging Face cache; offline and uncached it fails within seconds with
  :class:`~tokprune.errors.ModelNotFoundError` saying how to pass a local directory.

Random weights are identical on every machine for a seed (global RNG untouched); they measure
speed and plumbing, never quality.

Example::

    import torch
    from tokprune.families.pixart.models import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    img = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="np").images       # (1, 256, 256, 3)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from tokprune.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "MEDIUM_TRANSFORMER_CONFIG",
    "PIXART_SIGMA_XL_CONFIG",
    "TINY_TRANSFORMER_CONFIG",
    "binned_size",
    "build_medium_pipeline",
    "build_pipeline",
    "build_tiny_pipeline",
    "build_tiny_transformer",
]

#: ``--model`` alias -> hub id.
ALIASES: dict[str, str] = {"pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}

#: PixArt-Σ-XL/2 1024 (the hub checkpoint's transformer config; random weights for GPU timing).
PIXART_SIGMA_XL_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "num_attention_heads": 16, "attention_head_dim": 72, "cross_attention_dim": 1152, "caption_channels": 4096,
    "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "interpolation_scale": 2, "use_additional_conditions": False,
}  # fmt: skip

#: ``pixart-tiny``'s transformer: D = 4 x 8 = 32, 2 blocks, 256 px -> N = 256.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "num_attention_heads": 4, "attention_head_dim": 8, "cross_attention_dim": 32, "caption_channels": 32,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "use_additional_conditions": False,
}  # fmt: skip

#: ``pixart-medium``'s transformer: D = 6 x 64 = 384, 6 blocks, 512 px -> N = 1024 (CPU speed).
MEDIUM_TRANSFORMER_CONFIG: dict[str, Any] = {
    **TINY_TRANSFORMER_CONFIG, "sample_size": 64, "num_layers": 6, "num_attention_heads": 6,
    "attention_head_dim": 64, "cross_attention_dim": 384,
}  # fmt: skip

_T5_WIDTH = 32  # tiny T5 d_model = caption_channels of the offline transformers

#: The Σ pipeline's scheduler (DPM-Solver++ 2M over a linear beta schedule), as its scheduler_config.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "solver_order": 2, "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    "lower_order_final": True, "timestep_spacing": "linspace", "steps_offset": 0,
    # diffusers' default is -inf; any value below every lambda_t (about -5) gives the same timesteps, and a
    # finite one can be stored in a schedule's JSON (tokprune schedules refuse non-finite numbers).
    "lambda_min_clipped": -1000.0,
}  # fmt: skip


def _config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(
            f"PixArt transformer override(s) {unknown} are not config keys; expected some of {sorted(base)}"
        )
    return {**base, **overrides}


def build_tiny_transformer(*, seed: int = 0, medium: bool = False, **overrides: Any) -> PixArtTransformer2DModel:
    """A random ``PixArtTransformer2DModel`` (tiny, or ``medium=True``), eval mode, float32, CPU.

    Same weights everywhere for a ``seed``; the global RNG is left untouched. ``overrides``: any
    :data:`TINY_TRANSFORMER_CONFIG` key, e.g. ``num_layers=3``.
    """
    from diffusers import PixArtTransformer2DModel

    cfg = _config(MEDIUM_TRANSFORMER_CONFIG if medium else TINY_TRANSFORMER_CONFIG, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(**cfg)
    return model.eval()


def build_pipeline(transformer: PixArtTransformer2DModel, *, seed: int = 0) -> PixArtSigmaPipeline:
    """A complete random ``PixArtSigmaPipeline`` around ``transformer`` (tiny T5, tiny VAE, Σ scheduler)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from tokprune.tiny import _tiny_t5_tokenizer

    tokenizer = _tiny_t5_tokenizer()
    tokenizer.model_max_length = 300  # the Σ pipeline's max_sequence_length
    if int(transformer.config.caption_channels or 0) != _T5_WIDTH:
        raise ConfigError(
            f"the offline pipeline's T5 is {_T5_WIDTH} wide but the transformer's caption_channels is "
            f"{transformer.config.caption_channels}; build the transformer with caption_channels={_T5_WIDTH}"
        )
    t5_config = T5Config(
        vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    vae_kwargs: dict[str, Any] = {
        "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 4,
        "sample_size": int(transformer.config.sample_size) * 8,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 8, 8),  # 4 levels -> vae_scale_factor 8, as the SDXL VAE of PixArt-Σ
        "latent_channels": int(transformer.config.in_channels), "scaling_factor": 0.13025,
    }  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        text_encoder = T5EncoderModel(t5_config)
        torch.manual_seed(seed + 4)
        vae = AutoencoderKL(**vae_kwargs)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(*, seed: int = 0) -> PixArtSigmaPipeline:
    """Offline tiny PixArt-Σ pipeline (random weights; 256 px, N = 256, T = 300)."""
    return build_pipeline(build_tiny_transformer(seed=seed), seed=seed)


def build_medium_pipeline(*, seed: int = 0) -> PixArtSigmaPipeline:
    """Offline PixArt-architecture pipeline for CPU speed (6 blocks, width 384; 512 px, N = 1024, T = 300)."""
    return build_pipeline(build_tiny_transformer(seed=seed, medium=True), seed=seed)


def binned_size(sample_size: int, height: int, width: int) -> tuple[int, int]:
    """The (height, width) in pixels the Σ pipeline actually renders with ``use_resolution_binning=True``.

    The pipeline snaps every request to the aspect-ratio bin of its ``sample_size`` (128 -> the 1024
    table, 64 -> 512, 32 -> 256, 256 -> 2048); exports are made for this binned size.
    """
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    tables = {256: sigma.ASPECT_RATIO_2048_BIN, 128: alpha.ASPECT_RATIO_1024_BIN,
              64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}  # fmt: skip
    if int(sample_size) not in tables:
        raise ConfigError(
            f"PixArt sample_size {sample_size} has no resolution-binning table (expected one of {sorted(tables)}); "
            "call the pipeline with use_resolution_binning=False"
        )
    h, w = PixArtImageProcessor.classify_height_width_bin(int(height), int(width), ratios=tables[int(sample_size)])
    return int(h), int(w)
