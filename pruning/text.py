"""Special tokens that text pruning must never drop, computed from the pipeline's own tokenizers.

An SD3 call's text rows are ``77 CLIP rows ; max_sequence_length T5 rows`` (the two CLIP encoders
share positions, their features are concatenated along channels). Text pruning ranks the rows by
the attention mass they receive; the special tokens (CLIP's BOS and EOS, T5's EOS) carry the
sentence summary the model relies on, so they are protected. Padding rows are not protected: they
are the large, cheap target.

The transformer only sees embeddings, so the mask is made where the token ids exist: a thin
wrapper around the pipeline's public ``encode_prompt`` (installed as an instance attribute,
removed bit for bit) records, for every pipeline call, the ``(B, T)`` mask in the row order the
pipeline builds (``[negative prompts; prompts]`` under classifier-free guidance, each repeated
``num_images_per_prompt`` times) and hands it to the pruner. The eager sampler and the engine
runtime install the same wrapper.

Example::

    from tokprune.models import build_tiny_pipeline
    from tokprune.pruning.text import special_token_mask

    pipe = build_tiny_pipeline()
    mask = special_token_mask(pipe, ["a red circle"], max_sequence_length=8)   # (1, 77 + 8) bool
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["install_text_protect", "special_token_mask", "uninstall_text_protect"]

_WRAPPED = "_tokprune_text_protect"


def _as_list(prompt: str | Sequence[str] | None, n: int) -> list[str]:
    if prompt is None:
        return [""] * n
    if isinstance(prompt, str):
        return [prompt] * n
    return list(prompt)


def _tokenizer_mask(tokenizer: Any, prompts: list[str], length: int) -> torch.Tensor:
    """(P, length) bool: special tokens that are real (not padding) positions of ``prompts``."""
    enc = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_attention_mask=True,
        return_tensors="pt",
    )
    ids = enc.input_ids[:, :length]  # (P, L)
    real = enc.attention_mask[:, :length].bool()
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
    return torch.isin(ids, special) & real


def special_token_mask(
    pipe: Any,
    prompts: Sequence[str],
    *,
    max_sequence_length: int,
    prompts_2: Sequence[str] | None = None,
    prompts_3: Sequence[str] | None = None,
) -> torch.Tensor:
    """(P, 77 + max_sequence_length) bool, True at BOS/EOS positions of each prompt's text rows.

    ``prompts_2`` / ``prompts_3`` are what the second CLIP and the T5 tokenizer see (default: ``prompts``).
    """
    prompts = list(prompts)
    n = len(prompts)
    clip_len = int(pipe.tokenizer_max_length if hasattr(pipe, "tokenizer_max_length") else pipe.tokenizer.model_max_length)
    clip = _tokenizer_mask(pipe.tokenizer, prompts, clip_len)  # (P, 77)
    if getattr(pipe, "tokenizer_2", None) is not None:
        clip = clip | _tokenizer_mask(pipe.tokenizer_2, _as_list(prompts_2 or prompts, n), clip_len)
    if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
        t5 = _tokenizer_mask(pipe.tokenizer_3, _as_list(prompts_3 or prompts, n), int(max_sequence_length))
    else:  # no T5: its rows are zeros, nothing to protect
        t5 = torch.zeros(n, int(max_sequence_length), dtype=torch.bool)
    return torch.cat([clip, t5], dim=1)


def _call_mask(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The (B, T) mask of one ``encode_prompt`` call, or None when it was given embeddings."""
    prompt = kwargs.get("prompt")
    if prompt is None or kwargs.get("prompt_embeds") is not None:
        return None
    prompts = _as_list(prompt, 1)
    n = len(prompts)
    nipp = int(kwargs.get("num_images_per_prompt") or 1)
    msl = int(kwargs.get("max_sequence_length") or 256)
    pos = special_token_mask(
        pipe, prompts, max_sequence_length=msl,
        prompts_2=_as_list(kwargs.get("prompt_2") or prompts, n), prompts_3=_as_list(kwargs.get("prompt_3") or prompts, n),
    )
    rows = [pos.repeat_interleave(nipp, dim=0)]
    if kwargs.get("do_classifier_free_guidance", True):
        if kwargs.get("negative_prompt_embeds") is not None:
            return None
        neg = _as_list(kwargs.get("negative_prompt") or "", n)
        neg_mask = special_token_mask(
            pipe, neg, max_sequence_length=msl,
            prompts_2=_as_list(kwargs.get("negative_prompt_2") or neg, n),
            prompts_3=_as_list(kwargs.get("negative_prompt_3") or neg, n),
        )
        rows.insert(0, neg_mask.repeat_interleave(nipp, dim=0))  # the pipeline concatenates [negative; positive]
    return torch.cat(rows, dim=0)


def install_text_protect(
    pipe: Any,
    sink: Callable[[torch.Tensor | None], None],
    mask_of: Callable[[Any, dict[str, Any]], torch.Tensor | None] | None = None,
) -> None:
    """Wrap ``pipe.encode_prompt`` so every call hands its special-token mask to ``sink``.

    ``mask_of(pipe, arguments)`` computes the mask of one call from its arguments, bound by
    ``encode_prompt``'s signature (positional calls too); default: SD3's. Idempotent (a second
    install replaces the first); :func:`uninstall_text_protect` restores the pipeline bit for bit.
    Pipelines without ``encode_prompt`` or tokenizers are left alone.
    """
    import inspect

    uninstall_text_protect(pipe)
    original = getattr(pipe, "encode_prompt", None)
    if original is None or getattr(pipe, "tokenizer", None) is None:
        return
    mask_of = _call_mask if mask_of is None else mask_of
    signature = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        mask = None
        try:
            mask = mask_of(pipe, dict(signature.bind_partial(*args, **kwargs).arguments))
        except Exception as exc:  # never break generation for a protection mask
            logger.warning("could not compute the special-token mask (%s); special tokens are not protected", exc)
        sink(mask)
        return out

    pipe.__dict__["encode_prompt"] = encode_prompt
    pipe.__dict__[_WRAPPED] = True


def uninstall_text_protect(pipe: Any) -> None:
    """Undo :func:`install_text_protect` (no-op when not installed)."""
    if getattr(pipe, "__dict__", {}).pop(_WRAPPED, None):
        pipe.__dict__.pop("encode_prompt", None)
