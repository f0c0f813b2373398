"""The offline tiny SD3 / SD3.5 pipelines: exact architectures at toy width, seeded random weights.

Used by tests and demos; nothing is downloaded. At default call settings the tiny pipeline makes a
64x64 px image from a 32x32 latent with 16 channels: N = 256 image tokens (16x16 grid, patch 2) and
T = 77 + 256 = 333 text tokens. Random weights measure speed and plumbing, never quality.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from tokprune.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

logger = logging.getLogger(__name__)

_TINY_VARIANTS = {"sd3": "sd3", "sd3-tiny": "sd3", "sd3.5": "sd3.5", "sd3.5-tiny": "sd3.5"}

# The SD3 MMDiT at toy width. Every key is an SD3Transformer2DModel argument.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32,  # latent side; x vae_scale_factor 2 = 64 px default images
    "patch_size": 2,  # 32x32 latent -> 16x16 grid -> N = 256 image tokens
    "in_channels": 16,  # = VAE latent_channels, as in SD3
    "out_channels": 16,
    "num_layers": 2,  # the last block is context_pre_only, as in SD3
    "attention_head_dim": 8,
    "num_attention_heads": 4,  # inner dim D = 4 x 8 = 32
    "joint_attention_dim": 32,  # = T5 d_model: width of the text embeddings fed in
    "caption_projection_dim": 32,  # must equal D (heads x head_dim)
    "pooled_projection_dim": 64,  # = 2 CLIP projections of 32, concatenated
    "pos_embed_max_size": 48,  # 3x the default grid, like SD3 (192 vs 64): up to 192 px
    "dual_attention_layers": (),
    "qk_norm": None,
}
_TINY_SD35_CHANGES: dict[str, Any] = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}

_CLIP_MAX_LENGTH = 77  # diffusers reads tokenizer.model_max_length for the CLIP part of T
_T5_MAX_LENGTH = 256  # diffusers' default max_sequence_length; only used for truncation warnings
_T5_EXTRA_IDS = 100  # T5's sentinel tokens; transformers re-adds them on reload if missing
# Whole-word tokens so common prompts stay short; anything else falls back to characters.
_TINY_WORDS: tuple[str, ...] = tuple(
    """a an the of on in at and with photo picture image painting drawing small large big
    red green blue yellow orange purple pink black white gray brown circle square triangle
    star ring cross line shape shapes background left right top bottom center cat dog
    house tree car person sky sun""".split()
)


def _tiny_variant(variant: str) -> str:
    key = str(variant).strip().lower()
    if key not in _TINY_VARIANTS:
        raise ConfigError(
            f"tiny model variant {variant!r} is unknown; expected one of {sorted(_TINY_VARIANTS)} "
            f"('sd3' = SD3-medium architecture, 'sd3.5' adds RMS qk-norm and a dual-attention block)."
        )
    return _TINY_VARIANTS[key]


def tiny_transformer_config(variant: str = "sd3", **overrides: Any) -> dict[str, Any]:
    """The config dict :func:`build_tiny_transformer` uses, with ``overrides`` applied.

    ``caption_projection_dim`` follows ``num_attention_heads x attention_head_dim`` unless
    overridden explicitly (the model requires them equal).

    Example:
        >>> tiny_transformer_config("sd3.5", num_layers=3)["qk_norm"]
        'rms_norm'
    """
    config = dict(TINY_TRANSFORMER_CONFIG)
    if _tiny_variant(variant) == "sd3.5":
        config.update(_TINY_SD35_CHANGES)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ConfigError(
            f"build_tiny_transformer: unknown override(s) {unknown}; expected SD3Transformer2DModel "
            f"config keys: {sorted(config)}."
        )
    config.update(overrides)
    if "caption_projection_dim" not in overrides:
        config["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return config


def build_tiny_transformer(variant: str = "sd3", *, seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A tiny random ``SD3Transformer2DModel`` (2 layers, D = 32), in eval mode, float32, CPU.

    Same weights on every machine for a given ``seed`` (and torch version); the global RNG
    state is left untouched. Equal to ``build_tiny_pipeline(variant, seed=seed).transformer``
    when no overrides are given. Forward takes ~ms on CPU.

    Args:
        variant: ``"sd3"`` or ``"sd3.5"`` (RMS qk-norm, dual attention in block 0).
        seed: weight seed.
        **overrides: any :data:`TINY_TRANSFORMER_CONFIG` key, e.g. ``num_layers=4``.

    Example:
        >>> import torch
        >>> from tokprune.models import build_tiny_transformer
        >>> tr = build_tiny_transformer(num_layers=3)
        >>> out = tr(hidden_states=torch.randn(1, 16, 32, 32), encoder_hidden_states=torch.randn(1, 333, 32),
        ...          pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0])).sample
        >>> tuple(out.shape)
        (1, 16, 32, 32)
    """
    from diffusers import SD3Transformer2DModel

    config = tiny_transformer_config(variant, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**config)
    return model.eval()


def build_tiny_pipeline(variant: str = "sd3", *, seed: int = 0) -> StableDiffusion3Pipeline:
    """A complete random ``StableDiffusion3Pipeline`` built offline in ~a second.

    Parts: the tiny transformer of :func:`build_tiny_transformer`; two CLIP text encoders
    (hidden 8 and 16 like CLIP-L < CLIP-G, projection 32 each -> pooled 64; their
    concatenated hidden states, 24 wide, are zero-padded to the T5 width 32 by diffusers,
    as SD3 pads 2048 to 4096); a 2-layer T5 encoder (d_model 32 = joint_attention_dim);
    tokenizers built in memory (CLIP: byte-level BPE with full byte coverage plus a few
    whole words, ``model_max_length`` 77; T5: Unigram over words and characters);
    a 2-level ``AutoencoderKL`` (16 latent channels, scale factor 2, SD3's
    scaling/shift factors); ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

    Defaults: 64x64 px images, N = 256 image tokens, T = 77 + 256 = 333 text tokens.
    Deterministic (same weights everywhere for a seed), global RNG untouched, eval mode.
    ``save_pretrained`` / ``from_pretrained(local_files_only=True)`` round-trips the weights
    bit for bit; images match to ~1e-7 (1 ulp, weight alignment), and exactly when the
    directory is loaded with :func:`load_pipeline`.

    Example:
        >>> import torch
        >>> from tokprune.models import build_tiny_pipeline
        >>> pipe = build_tiny_pipeline("sd3.5")
        >>> img = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0,
        ...            generator=torch.Generator().manual_seed(0), output_type="np").images
        >>> img.shape
        (1, 64, 64, 3)
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    variant = _tiny_variant(variant)
    transformer = build_tiny_transformer(variant, seed=seed)
    clip_tokenizer = _tiny_clip_tokenizer()
    t5_tokenizer = _tiny_t5_tokenizer()

    def clip_config(hidden: int, heads: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, hidden_act="gelu",
            num_hidden_layers=2,  # diffusers reads hidden_states[-2]: the first layer's output
            num_attention_heads=heads, max_position_embeddings=_CLIP_MAX_LENGTH, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,  # pooled output = first EOS position
        )  # fmt: skip

    t5_config = T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # as T5 v1.1 (SD3's T5-XXL)
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    vae_kwargs: dict[str, Any] = {
        "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 16),  # 2 levels -> vae_scale_factor 2
        "latent_channels": TINY_TRANSFORMER_CONFIG["in_channels"],
        "scaling_factor": 1.5305, "shift_factor": 0.0609,  # SD3's
        "use_quant_conv": False, "use_post_quant_conv": False,  # as SD3's VAE
    }  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModelWithProjection(clip_config(hidden=8, heads=2))
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(hidden=16, heads=4))
        torch.manual_seed(seed + 3)
        text_encoder_3 = T5EncoderModel(t5_config)
        torch.manual_seed(seed + 4)
        vae = AutoencoderKL(**vae_kwargs)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=_tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_clip_tokenizer():
    """CLIP-style byte-level BPE, laid out exactly as transformers' CLIPTokenizer rebuilds it.

    Vocab: <|startoftext|> = 0, <|endoftext|> = 1 (also pad and unk), all 256 byte symbols
    with and without the end-of-word marker (so no text is ever unknown), then the merges
    that spell each of ``_TINY_WORDS`` as one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab: dict[str, int] = {bos: 0, eos: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:  # left-to-right merges: "r e" -> "re", "re d</w>" -> "red</w>"
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if current + symbol not in vocab:
                vocab[current + symbol] = len(vocab)
                merges.append((current, symbol))
            current += symbol

    bpe = models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=eos)
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    split = pre_tokenizers.Split(Regex(words), behavior="removed", invert=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(
        (eos, 1), (bos, 0), trim_offsets=False, add_prefix_space=False
    )
    return CLIPTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
        model_max_length=_CLIP_MAX_LENGTH,
    )  # fmt: skip


def _tiny_t5_tokenizer():
    """T5-style Unigram tokenizer, laid out exactly as transformers' T5Tokenizer rebuilds it.

    Vocab: <pad> = 0, </s> = 1, <unk> = 2, "▁", whole words, single characters (with and
    without the word-start marker), then the 100 sentinels in reverse, as in T5. Like T5
    it is case-sensitive and has no normalizer.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in _TINY_WORDS]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -3.0), ("▁" + char, -3.5)]  # whole words (score -1) beat spelling
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "▁", "prepend_scheme": "always", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=_T5_EXTRA_IDS,
        model_max_length=_T5_MAX_LENGTH,
    )  # fmt: skip
