"""The PixArt-architecture yardstick: a small, complete ``PixArtSigmaPipeline`` for the shapes world.

The ``shapes`` yardstick is an SD3 pipeline; this is its PixArt-Σ twin, so the quality comparison
can be run on the second family too (``--model pixart-shapes``). Built offline from a
:class:`PixArtShapesConfig`:

- transformer: ``PixArtTransformer2DModel`` as in PixArt-Σ (adaLN-single, self-attention,
  cross-attention to the T5 tokens, GELU MLP, **learned sigma**: 8 output channels), patch 2 over
  the 4x64x64 latent -> **1024 image tokens**; 8 blocks, hidden 256 = 4 heads x 64: 9.1 M parameters
  (the SD3 ``shapes`` has 18.5 M at the same width, as MMDiT blocks carry two streams; per step the
  two cost about the same, ~12 GMAC a sample, so a 4-minute run gets about as many steps a second);
- text: the ``shapes`` T5-style word-exact tokenizer (built in memory from the closed vocabulary) and a
  small random T5 encoder (d_model 128, 2 layers), frozen as in the SD3 recipe; **T = 32** T5 tokens;
- VAE: the already trained ``shapes`` VAE (128 px <-> 4x64x64), reused unchanged except that its
  ``shift_factor`` is set to 0: the PixArt pipeline decodes ``latents / scaling_factor`` (no shift),
  so this model is trained on ``z * scaling_factor`` (mean ~0.5, std ~1);
- scheduler: PixArt-Σ's DPM-Solver++ 2M over the linear beta schedule, epsilon prediction
  (:data:`tokprune.families.pixart.models.SCHEDULER_CONFIG`).

Sampling must not use the pipeline's resolution binning (its tables start at 256 px, so 128 px
would be rendered at 512): :func:`exact_size` makes the pipeline keep the size it is asked for, and
the loader records ``use_resolution_binning=False`` as a call default for tokprune's tools.

Example::

    from tokprune.yardstick.pixart_model import load_pipeline
    pipe, meta = load_pipeline("yardstick/weights/pixart-shapes")
    images = pipe("a large red circle in the center", **meta.generation_kwargs()).images
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from tokprune.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["PIXART_PRESETS", "PixArtShapesConfig", "build_pipeline", "exact_size", "load_pipeline", "shapes_vae_dir"]


@dataclasses.dataclass(frozen=True)
class PixArtShapesConfig:
    """Sizes of every part. ``base`` is the trained one; ``smoke`` is for tests and CPU smoke runs."""

    hidden: int = 256  # heads = hidden // head_dim (256: as many steps in 4 minutes as the SD3 shapes got per second)
    layers: int = 8
    head_dim: int = 64
    t5_hidden: int = 128  # = the transformer's caption_channels
    t5_layers: int = 2
    max_sequence_length: int = 32  # T5 tokens; the longest caption is 26 words + </s>
    latent_channels: int = 4  # fixed by the shapes VAE
    latent_size: int = 64  # 128 px / VAE scale 2
    learned_sigma: bool = True  # out_channels 8, as PixArt-Σ; the variance half trained with IDDPM's VLB term

    def __post_init__(self) -> None:
        if self.hidden % self.head_dim:
            raise ConfigError(f"PixArtShapesConfig: hidden={self.hidden} must be a multiple of head_dim={self.head_dim}")

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    @property
    def text_tokens(self) -> int:
        return self.max_sequence_length


PIXART_PRESETS: dict[str, PixArtShapesConfig] = {
    "base": PixArtShapesConfig(),
    "smoke": PixArtShapesConfig(hidden=32, layers=2, head_dim=16, t5_hidden=32, t5_layers=1),
}


def shapes_vae_dir() -> Path:
    """The trained ``shapes`` VAE this model reuses (``yardstick/weights/shapes/vae``)."""
    from tokprune.yardstick import SHAPES_DIR

    return SHAPES_DIR / "vae"


def build_transformer(cfg: PixArtShapesConfig, seed: int = 0):
    """A random ``PixArtTransformer2DModel`` with PixArt-Σ's block design at this config's size."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed + 401)
    return PixArtTransformer2DModel(
        sample_size=cfg.latent_size, patch_size=2, in_channels=cfg.latent_channels,
        out_channels=2 * cfg.latent_channels if cfg.learned_sigma else cfg.latent_channels,
        num_layers=cfg.layers, num_attention_heads=cfg.hidden // cfg.head_dim, attention_head_dim=cfg.head_dim,
        cross_attention_dim=cfg.hidden, caption_channels=cfg.t5_hidden, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1, use_additional_conditions=False,
    )  # fmt: skip


def build_text_encoder(cfg: PixArtShapesConfig, tokenizer, seed: int = 0):
    """A small random T5 encoder (frozen): fixed, injective embeddings of the 22-word vocabulary in order."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 403)
    conf = T5Config(
        vocab_size=len(tokenizer), d_model=cfg.t5_hidden, d_kv=32 if cfg.t5_hidden >= 64 else 8,
        d_ff=2 * cfg.t5_hidden, num_layers=cfg.t5_layers, num_heads=max(1, cfg.t5_hidden // 32),
        relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    return T5EncoderModel(conf).requires_grad_(False).eval()


def load_shapes_vae(vae_dir: str | Path | None = None):
    """The trained shapes VAE with ``shift_factor`` 0 (the PixArt pipeline decodes without a shift)."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir) if vae_dir is not None else shapes_vae_dir()
    if not (vae_dir / "config.json").is_file():
        raise ModelNotFoundError(
            f"{vae_dir} has no config.json: the PixArt yardstick reuses the trained shapes VAE "
            "(yardstick/weights/shapes/vae, shipped with tokprune); pass vae_dir= to another trained one"
        )
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    vae.register_to_config(shift_factor=0.0)
    return vae.requires_grad_(False).eval()


def exact_size(pipe: Any) -> Any:
    """Make ``pipe`` render the size it is asked for (no aspect-ratio binning: its tables start at 256 px)."""
    pipe.image_processor.classify_height_width_bin = lambda height, width, ratios=None: (int(height), int(width))
    return pipe


def build_pipeline(cfg: PixArtShapesConfig, seed: int = 0, vae_dir: str | Path | None = None):
    """A complete ``PixArtSigmaPipeline`` (CPU, fp32): random transformer, frozen T5, the trained shapes VAE."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from tokprune.families.pixart.models import SCHEDULER_CONFIG
    from tokprune.yardstick.model import build_tokenizers

    _, t5_tok = build_tokenizers(cfg.max_sequence_length)
    pipe = PixArtSigmaPipeline(
        tokenizer=t5_tok,
        text_encoder=build_text_encoder(cfg, t5_tok, seed),
        vae=load_shapes_vae(vae_dir),
        transformer=build_transformer(cfg, seed),
        scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return exact_size(pipe)


def load_pipeline(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(pipe, meta)`` from a saved PixArt yardstick directory, offline, every part cast to ``dtype``."""
    from diffusers import PixArtSigmaPipeline

    from tokprune.yardstick.model import check_tokenizers, load_meta

    meta = load_meta(directory)
    pipe = PixArtSigmaPipeline.from_pretrained(str(directory), local_files_only=True)
    # the T5 tokenizer must still map every word to one token (transformers version drift)
    from tokprune.yardstick.model import build_tokenizers

    clip, _ = build_tokenizers(meta.max_sequence_length)
    check_tokenizers(clip, pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return exact_size(pipe), meta


def generation_kwargs(meta: Any) -> dict[str, Any]:
    """``meta.generation_kwargs()`` plus ``use_resolution_binning=False`` (call defaults for tokprune's tools)."""
    return {**meta.generation_kwargs(), "use_resolution_binning": False}
