"""Special tokens (CLIP BOS / EOS) that U-Net text pruning never drops, from the pipeline's own tokenizers.

SD1.5 and SDXL pipelines feed the U-Net 77 CLIP rows per prompt (SDXL: the two encoders' hidden states
concatenated along channels, so a row is special when either tokenizer puts BOS/EOS there). Padding
positions are not protected. :func:`call_mask` is the family's ``mask_of`` for the one
``encode_prompt`` wrapper (:func:`tokprune.pruning.text.install_text_protect`, which binds arguments by
the method's signature: ``StableDiffusionPipeline`` calls it positionally).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch



def _mask(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    length = int(tokenizer.model_max_length)
    enc = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_attention_mask=True,
                    return_tensors="pt")  # fmt: skip
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=enc.input_ids.dtype)
    return torch.isin(enc.input_ids, special) & enc.attention_mask.bool()


def special_token_mask(pipe: Any, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> torch.Tensor:
    """(P, 77) bool: True at each prompt's BOS/EOS rows (either tokenizer for SDXL).

    >>> from tokprune.families.unet.models import build_pipeline
    >>> special_token_mask(build_pipeline("sd15-tiny"), ["a red circle"])[0, :5].tolist()
    [True, False, False, False, True]
    """
    prompts = list(prompts)
    m = _mask(pipe.tokenizer, prompts)
    if getattr(pipe, "tokenizer_2", None) is not None:
        m = m | _mask(pipe.tokenizer_2, list(prompts_2 or prompts))
    return m


def _as_list(p: Any, n: int) -> list[str]:
    if p is None:
        return [""] * n
    return [p] * n if isinstance(p, str) else list(p)


def call_mask(pipe: Any, a: dict[str, Any]) -> torch.Tensor | None:
    """The (B, 77) mask of one ``encode_prompt`` call (its bound arguments ``a``), in the U-Net's row order
    (``[negative; positive]`` under CFG, each repeated ``num_images_per_prompt``); None for embeddings."""
    if a.get("prompt") is None or a.get("prompt_embeds") is not None:
        return None
    prompts = _as_list(a["prompt"], 1)
    n, nipp = len(prompts), int(a.get("num_images_per_prompt") or 1)
    rows = [special_token_mask(pipe, prompts, _as_list(a.get("prompt_2") or prompts, n)).repeat_interleave(nipp, 0)]
    if a.get("do_classifier_free_guidance", True) and a.get("negative_prompt_embeds") is None:
        neg = _as_list(a.get("negative_prompt") or "", n)
        neg_mask = special_token_mask(pipe, neg, _as_list(a.get("negative_prompt_2") or neg, n))
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False) and a.get("negative_prompt") is None:
            neg_mask = torch.zeros_like(neg_mask)  # SDXL: zero embeddings, no real tokens
        rows.insert(0, neg_mask.repeat_interleave(nipp, 0))
    return torch.cat(rows, dim=0)
