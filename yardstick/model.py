"""The yardstick model: a small, complete ``StableDiffusion3Pipeline`` for the shapes world.

Everything is built offline from a :class:`ModelConfig`: word-exact tokenizers made from the
dataset's closed vocabulary (CLIP-style BPE x2, T5-style Unigram), small random text
encoders (kept frozen, as in SD3), a small ``AutoencoderKL`` (trained first by
:mod:`tokprune.yardstick.train`), an ``SD3Transformer2DModel`` and a
``FlowMatchEulerDiscreteScheduler``.

Sizes for the default config (128x128 images):

- VAE: 2 blocks, one 2x downsample: image 3x128x128 -> latent 4x64x64;
- transformer: patch 2 -> **1024 image tokens** (32x32), text 77 CLIP + 32 T5 = 109 tokens;
  8 ``JointTransformerBlock``s, hidden 256 = 4 heads x 64, RMS qk-norm (SD3.5 style);
  18.5 M parameters (stored fp16: 37 MB; the whole directory is ~41 MB);
- text encoders: 2 x CLIP (hidden 64, 2 layers, 83 k params each) + T5 (d_model 128, 2 layers,
  334 k), random and frozen: they only need to be fixed, injective embeddings of a 22-word
  vocabulary with word order; each MMDiT block's text stream learns the rest (SD3 keeps its
  encoders frozen too, and a fixed "" embedding makes classifier-free guidance consistent);
- VAE: 0.62 M parameters.

The pipeline directory also holds ``yardstick.json`` (generation settings the model was
trained for: ``max_sequence_length`` is 32, *not* the pipeline's default 256). Load with::

    from tokprune.yardstick.model import load_pipeline
    pipe, meta = load_pipeline("models/shapes")
    images = pipe("a large red circle in the center", **meta.generation_kwargs()).images
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from tokprune.errors import ConfigError, ModelNotFoundError
from tokprune.fsutil import atomic_output, atomic_write_json
from tokprune.yardstick.dataset import EVAL_SEED, IMAGE_SIZE, vocabulary

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77  # SD3's CLIP length; the pipeline reads it from tokenizer.model_max_length
META_FILE = "yardstick.json"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of every part. ``base`` is what ships; ``smoke`` is for tests and CPU smoke runs."""

    hidden: int = 256  # transformer width; heads = hidden // head_dim
    layers: int = 8  # JointTransformerBlocks (the last one is context_pre_only)
    head_dim: int = 64
    qk_norm: str | None = "rms_norm"  # SD3.5-style; None for SD3.0 blocks
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)  # len 2 -> one 2x downsample: 128 px -> 64x64 latent
    clip_hidden: int = 64  # each CLIP encoder; both together must fit in t5_hidden (SD3 pads CLIP to T5 width)
    clip_layers: int = 2
    t5_hidden: int = 128
    t5_layers: int = 2
    max_sequence_length: int = 32  # T5 tokens; longest caption is 26 words + </s>
    shift: float = 2.0  # flow-matching timestep shift (SD3 uses 3.0 at 4096 tokens; 1024 tokens want less)

    def __post_init__(self) -> None:
        if self.hidden % self.head_dim or 2 * self.clip_hidden > self.t5_hidden:
            raise ConfigError(
                f"ModelConfig: hidden={self.hidden} must be a multiple of head_dim={self.head_dim} and "
                f"2*clip_hidden={2 * self.clip_hidden} must be <= t5_hidden={self.t5_hidden}"
            )

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // self.vae_scale

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    @property
    def text_tokens(self) -> int:
        return CLIP_MAX_LENGTH + self.max_sequence_length


PRESETS: dict[str, ModelConfig] = {
    "base": ModelConfig(),
    "smoke": ModelConfig(
        hidden=32, layers=2, head_dim=16, vae_channels=(8, 16), clip_hidden=16, clip_layers=1, t5_hidden=32, t5_layers=1
    ),
}


# --------------------------------------------------------------------------------------- tokenizers


def build_tokenizers(max_sequence_length: int = 32) -> tuple[Any, Any]:
    """``(clip_tokenizer, t5_tokenizer)`` that map every vocabulary word to exactly one token.

    The T5 tokenizer's ``model_max_length`` is the T5 length the model was trained with
    (pass it to the pipeline as ``max_sequence_length``; the pipeline's own default is 256).

    CLIP: byte-level BPE with ``</w>`` word ends, as ``CLIPTokenizer`` rebuilds it from vocab +
    merges. Merges grow each word from its end (``d</w>`` -> ``ed</w>`` -> ``red</w>``): the only
    mergeable pair inside a word is always (next char, suffix so far), so tokenization is
    exactly one token per word whatever the merge order. T5: Unigram over ``▁word`` pieces.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    words = vocabulary()
    chars = sorted({c for w in words for c in w})
    clip_vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        clip_vocab.setdefault(c, len(clip_vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        suffix = w[-1] + "</w>"
        clip_vocab.setdefault(suffix, len(clip_vocab))
        for i in range(len(w) - 2, -1, -1):
            merged = w[i:] + "</w>"
            if merged not in clip_vocab:
                clip_vocab[merged] = len(clip_vocab)
                merges.append((w[i], suffix))
            suffix = merged
    clip = CLIPTokenizer(
        vocab=clip_vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CLIP_MAX_LENGTH,
    )
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + w, 0.0) for w in words] + [(c, -10.0) for c in chars]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_sequence_length)
    check_tokenizers(clip, t5)
    return clip, t5


def check_tokenizers(clip, t5) -> None:
    """Raise unless every vocabulary word is one token in both (guards transformers version drift)."""
    for w in vocabulary():
        c_ids, t_ids = clip(w).input_ids, t5(w).input_ids
        if len(c_ids) != 3 or len(t_ids) != 2 or clip.unk_token_id in c_ids[1:-1] or t5.unk_token_id in t_ids:
            raise ConfigError(
                f"tokenizer splits the word {w!r}: CLIP ids {c_ids} (expected [bos, word, eos]), T5 ids {t_ids} "
                "(expected [word, </s>]); the transformers version changed how CLIPTokenizer/T5Tokenizer build"
            )


# --------------------------------------------------------------------------------------- parts


def build_text_encoders(cfg: ModelConfig, clip_tokenizer, t5_tokenizer, seed: int = 0) -> tuple[Any, Any, Any]:
    """Two CLIP text encoders with projection and one T5 encoder, random (seeded) and frozen."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    encoders = []
    for k in range(2):
        torch.manual_seed(seed + 101 + k)
        conf = CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=cfg.clip_hidden,
            intermediate_size=2 * cfg.clip_hidden,
            projection_dim=cfg.clip_hidden,
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=max(1, cfg.clip_hidden // 32),
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,  # 1, not the legacy 2: pooling takes the first EOS
            pad_token_id=clip_tokenizer.pad_token_id,
        )
        encoders.append(CLIPTextModelWithProjection(conf))
    torch.manual_seed(seed + 103)
    t5conf = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=cfg.t5_hidden,
        d_kv=32,
        d_ff=2 * cfg.t5_hidden,
        num_layers=cfg.t5_layers,
        num_heads=max(1, cfg.t5_hidden // 32),
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    encoders.append(T5EncoderModel(t5conf))
    for enc in encoders:
        enc.requires_grad_(False).eval()
    return tuple(encoders)


def build_vae(cfg: ModelConfig, seed: int = 0):
    """A small ``AutoencoderKL`` (no attention, no quant convs, like SD3's); trained before the transformer."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 201)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(16, cfg.vae_channels[0]),
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from latent statistics after VAE training
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def build_transformer(cfg: ModelConfig, seed: int = 0):
    """The ``SD3Transformer2DModel``: patch 2 over the latent, text width = T5 width."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed + 301)
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size,
        patch_size=2,
        in_channels=cfg.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.hidden // cfg.head_dim,
        joint_attention_dim=cfg.t5_hidden,
        caption_projection_dim=cfg.hidden,
        pooled_projection_dim=2 * cfg.clip_hidden,
        out_channels=cfg.latent_channels,
        pos_embed_max_size=cfg.latent_size // 2,
        qk_norm=cfg.qk_norm,
    )


def build_scheduler(cfg: ModelConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_pipeline(cfg: ModelConfig, seed: int = 0):
    """A complete, untrained ``StableDiffusion3Pipeline`` (CPU, fp32)."""
    from diffusers import StableDiffusion3Pipeline

    clip_tok, t5_tok = build_tokenizers(cfg.max_sequence_length)
    clip1, clip2, t5 = build_text_encoders(cfg, clip_tok, t5_tok, seed)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(cfg, seed),
        scheduler=build_scheduler(cfg),
        vae=build_vae(cfg, seed),
        text_encoder=clip1,
        tokenizer=clip_tok,
        text_encoder_2=clip2,
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------- save / load


@dataclasses.dataclass(frozen=True)
class YardstickMeta:
    """Contents of ``yardstick.json``: how the model must be sampled, and what it was trained as."""

    max_sequence_length: int
    height: int = IMAGE_SIZE
    width: int = IMAGE_SIZE
    num_inference_steps: int = 28
    guidance_scale: float = 5.0
    eval_seed: int = EVAL_SEED
    config: dict = dataclasses.field(default_factory=dict)

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pipe(prompt, **kwargs)`` matching training."""
        return call_kwargs(steps=self.num_inference_steps, guidance=self.guidance_scale, height=self.height,
                           width=self.width, max_sequence_length=self.max_sequence_length)


def call_kwargs(*, steps: int, guidance: float, height: int, width: int, max_sequence_length: int) -> dict[str, Any]:
    """The pipeline's keyword arguments for these sampling settings (every yardstick call is made with them)."""
    return {
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "max_sequence_length": max_sequence_length,
    }


def save_pipeline(pipe, directory: str | Path, meta: YardstickMeta, transformer_dtype=torch.float16) -> Path:
    """``save_pretrained`` + ``yardstick.json``; the pipeline object is left unchanged.

    The transformer's weights are stored in ``transformer_dtype`` (fp16 halves the largest
    file); ``from_pretrained`` without a dtype loads them back as fp32.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    if transformer_dtype != torch.float32:
        if not weights.is_file():
            raise ModelNotFoundError(f"{weights} not written by save_pretrained; expected a single unsharded file")
        state = {k: v.detach().to("cpu", transformer_dtype).contiguous() for k, v in pipe.transformer.state_dict().items()}
        with atomic_output(weights) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_json(directory / META_FILE, dataclasses.asdict(meta), indent=2)
    return directory


def load_meta(directory: str | Path) -> YardstickMeta:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} not found: not a yardstick model directory (train one with `python -m tokprune.yardstick.train`)"
        )
    return YardstickMeta(**json.loads(path.read_text()))


def load_pipeline(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(pipe, meta)`` from a saved yardstick directory, offline, every part cast to ``dtype``."""
    from diffusers import StableDiffusion3Pipeline

    meta = load_meta(directory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(directory), local_files_only=True)
    check_tokenizers(pipe.tokenizer, pipe.tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe, meta
