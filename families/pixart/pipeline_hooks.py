"""Make a ``PixArtSigmaPipeline`` tell tokprune what each call does, as SD3's pipeline does by itself.

tokprune's sampler and runtime read two things from the pipeline while it runs:

- ``pipe.do_classifier_free_guidance`` and ``pipe.guidance_scale`` (one selection per prompt for both
  CFG halves, scored on the guided prediction). ``StableDiffusion3Pipeline`` exposes them as
  properties; ``PixArtSigmaPipeline`` keeps them local to ``__call__``.
- the special tokens text pruning must keep (``pruner.call_text_protect``): for T5 the EOS, the last
  unmasked position of each row's ``prompt_attention_mask``.

:func:`bind` records both per call: the pipeline's class is swapped for a same-named subclass whose
``__call__`` sets the two attributes (and reads ``negative_prompt=None``, which generic callers pass
as SD3 takes it, as PixArt's default ``""``), and ``encode_prompt`` is wrapped (instance attribute) to hand the
``[uncond; cond]`` EOS mask to a sink. :func:`unbind` restores class and attributes exactly.

Example::

    from tokprune import pruning
    pruner = pruning.apply(pipe, plan)      # calls FAMILY.bind_pipeline(pipe, pruner), which calls bind()
    pipe("a red circle", guidance_scale=4.5)
    pipe.guidance_scale, pruner.call_text_protect.shape    # 4.5, (2, 300)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["bind", "unbind", "eos_mask"]

_MARK = "_tokprune_pixart_bound"
_ATTRS = ("guidance_scale", "do_classifier_free_guidance")
_SUBCLASSES: dict[type, type] = {}


def eos_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the last unmasked position of each row of a (B, T) keep-mask (T5's EOS)."""
    keep = mask.bool()
    last = (keep.long() * torch.arange(1, keep.shape[1] + 1, device=keep.device)).argmax(dim=1)
    protect = torch.zeros_like(keep)
    protect[torch.arange(keep.shape[0], device=keep.device), last] = True
    return protect & keep


def _recording(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` records the guidance of each call."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        import inspect

        bound = inspect.signature(cls.__call__).bind_partial(self, *args, **kwargs)
        scale = float(bound.arguments.get("guidance_scale", inspect.signature(cls.__call__).parameters["guidance_scale"].default))
        self.__dict__["guidance_scale"] = scale
        self.__dict__["do_classifier_free_guidance"] = scale > 1.0  # the pipeline's own rule
        if "negative_prompt" in kwargs and kwargs["negative_prompt"] is None:
            kwargs["negative_prompt"] = ""  # PixArt's default; None (SD3's default, what generic callers pass) fails
        return cls.__call__(self, *args, **kwargs)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _SUBCLASSES[cls] = sub
    return sub


def bind(pipe: Any, sink: Callable[[torch.Tensor | None], None]) -> None:
    """Record each call's guidance on ``pipe`` and send each call's (B, T) EOS mask to ``sink``. Idempotent."""
    unbind(pipe)
    original_cls = type(pipe)
    encode = pipe.encode_prompt

    @functools.wraps(encode)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        out = encode(*args, **kwargs)
        pos_mask, neg_mask = out[1], out[3]
        cfg = args[1] if len(args) > 1 else kwargs.get("do_classifier_free_guidance", True)
        masks = [neg_mask, pos_mask] if cfg and neg_mask is not None else [pos_mask]
        sink(eos_mask(torch.cat(masks)) if all(m is not None for m in masks) else None)
        return out

    pipe.__dict__["encode_prompt"] = encode_prompt
    pipe.__dict__[_MARK] = original_cls
    pipe.__class__ = _recording(original_cls)


def unbind(pipe: Any) -> None:
    """Undo :func:`bind` (no-op when not bound): class, ``encode_prompt`` and the recorded attributes."""
    original_cls = pipe.__dict__.pop(_MARK, None)
    if original_cls is None:
        return
    pipe.__class__ = original_cls
    pipe.__dict__.pop("encode_prompt", None)
    for name in _ATTRS:
        pipe.__dict__.pop(name, None)
