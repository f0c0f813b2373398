"""Count the transformer multiply-accumulates that actually ran, whatever skipped what.

Caches (diffusers' TaylorSeer, MagCache, first-block cache) and tokprune's plans decide at run
time which blocks, attention modules or whole calls to skip, so MACs are counted, not assumed:
:class:`MacCounter` is a ``TorchFunctionMode`` that, only while the transformer's forward is
running, adds the MACs of every matmul-like call from its operands' shapes:

- ``F.linear``: rows x in x out; ``F.conv2d``: output elements x (in/groups) x kh x kw;
- ``F.scaled_dot_product_attention``: B x H x Lq x Lk x (E + Ev) (QK^T and AV);
- ``matmul`` / ``@`` / ``bmm`` / ``baddbmm``: output elements x inner dimension.

Elementwise work (norms, softmax, GELU, a cache's residual add or Taylor extrapolation) is not a
MAC, as in :mod:`tokprune.pruning.macs` and ``FlopCounterMode``. It changes no numerics (no
kernel is swapped), so the counted run is the measured run. ``counted / (steps * dense_macs(g))``
puts any method on the budget's MAC axis.

Example::

    from tokprune.yardstick.counting import MacCounter
    with MacCounter(pipe.transformer) as mc:
        pipe("a red circle", num_inference_steps=8)
    mc.total, mc.calls, mc.per_call          # MACs, transformer calls, MACs of each call
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

__all__ = ["MacCounter", "call_macs"]


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def call_macs(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """MACs of one torch function call (0 for anything that is not a matmul, conv or attention)."""
    try:
        if func is F.linear:
            x, w = args[0], (args[1] if len(args) > 1 else kwargs["weight"])
            return _numel(x.shape[:-1]) * int(w.shape[0]) * int(w.shape[1])
        if func is F.conv2d:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            return out.numel() * _numel(w.shape[1:])
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            lq, e = int(q.shape[-2]), int(q.shape[-1])
            lk, ev = int(k.shape[-2]), int(v.shape[-1])
            return _numel(q.shape[:-2]) * lq * lk * (e + ev)
        if func in _MATMULS:
            a = args[1] if func is torch.baddbmm else args[0]
            inner = int(a.shape[-1])
            return out.numel() * inner
    except (AttributeError, IndexError, KeyError, TypeError):  # an unusual call form: count nothing, say so once
        logger.debug("could not count MACs of %s", getattr(func, "__name__", func))
    return 0


_MATMULS = (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm, torch.baddbmm)


class MacCounter(TorchFunctionMode):
    """Context manager: MACs of every call of ``transformer`` made while it is active.

    ``total`` (MACs), ``calls`` (transformer forwards), ``per_call`` (list of each call's MACs).
    Only work inside the transformer's forward is counted (text encoders and VAE are not).
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.total = 0
        self.per_call: list[int] = []
        self._depth = 0
        self._handles: list[Any] = []

    @property
    def calls(self) -> int:
        return len(self.per_call)

    def __enter__(self) -> "MacCounter":
        def pre(_module: Any, _args: Any) -> None:
            self._depth += 1
            if self._depth == 1:
                self.per_call.append(0)

        def post(_module: Any, _args: Any, _out: Any) -> None:
            self._depth -= 1

        self._handles = [
            self.transformer.register_forward_pre_hook(pre),
            self.transformer.register_forward_hook(post),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0
        return super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._depth > 0:
            m = call_macs(func, args, kwargs, out)
            if m:
                self.total += m
                self.per_call[-1] += m
        return out
