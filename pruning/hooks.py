"""The one named installer of tokprune's forward replacements, through diffusers' hook registry.

``install_forward(module, name, fn)`` makes ``module(...)`` call ``fn(*args, **kwargs)`` instead of
its own forward; ``uninstall_forward(module, name)`` undoes it and ``installed(module, name)`` returns
``fn``. With diffusers' hook registry (``diffusers.hooks.HookRegistry`` / ``ModelHook``, diffusers
>= 0.33) the replacement is a stateful ``ModelHook`` registered under ``name``, so it composes with
diffusers' own hooks (caches, offloading) and ``HookRegistry.reset_stateful_hooks()`` resets it
(``fn.reset()``). On older diffusers it shadows the module's ``forward`` with an instance attribute,
which ``nn.Module.__call__`` picks up. Parameters are never touched either way.

Example::

    from tokprune.pruning.hooks import install_forward, uninstall_forward
    install_forward(transformer, "tokprune.pruning", pruner)   # transformer(...) -> pruner(...)
    uninstall_forward(transformer, "tokprune.pruning")          # the original forward again
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["install_forward", "installed", "uninstall_forward"]

_FALLBACK_ATTR = "_tokprune_forward_hooks"


def _registry_cls() -> Any:
    try:
        from diffusers.hooks import HookRegistry
    except ImportError:  # diffusers < 0.33: no hook registry
        return None
    return HookRegistry


def _hook(fn: Callable[..., Any]) -> Any:
    from diffusers.hooks import ModelHook

    class _ForwardHook(ModelHook):
        """Replaces the forward with ``fn``; stateful so ``reset_stateful_hooks`` forgets a run."""

        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.fn = fn

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.fn(*args, **kwargs)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            reset = getattr(self.fn, "reset", None)
            if callable(reset):
                reset()
            return module

    return _ForwardHook()


def install_forward(module: torch.nn.Module, name: str, fn: Callable[..., Any]) -> None:
    """Route ``module``'s forward to ``fn`` under ``name`` (an existing ``name`` is replaced)."""
    uninstall_forward(module, name)
    registry = _registry_cls()
    if registry is not None:
        registry.check_if_exists_or_initialize(module).register_hook(_hook(fn), name)
        return
    hooks = module.__dict__.setdefault(_FALLBACK_ATTR, {})
    hooks[name] = fn
    module.__dict__["forward"] = fn


def installed(module: torch.nn.Module, name: str) -> Any:
    """The ``fn`` installed under ``name``, or None."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None:
        hook = registry.get_hook(name)
        if hook is not None:
            return hook.fn
    return module.__dict__.get(_FALLBACK_ATTR, {}).get(name)


def uninstall_forward(module: torch.nn.Module, name: str) -> None:
    """Undo :func:`install_forward` (no-op when nothing is installed under ``name``)."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None and registry.get_hook(name) is not None:
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:  # the module is as diffusers built it: no registry, the class's forward
            module.__dict__.pop("forward", None)
            del module._diffusers_hook
        return
    hooks = module.__dict__.get(_FALLBACK_ATTR)
    if hooks and name in hooks:
        del hooks[name]
        module.__dict__.pop("forward", None)
        if not hooks:
            module.__dict__.pop(_FALLBACK_ATTR, None)
