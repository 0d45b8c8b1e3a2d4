"""Model registry: names that spell the configuration (``mae_vit_base_patch16_dec512d8b``) -> constructors."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

__all__ = ["create_model", "list_models", "register_model"]


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"register_model: {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if pattern in n)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``kwargs`` override its configuration fields (e.g. ``norm_pix_loss=False``)."""
    if name not in _REGISTRY:
        raise ValueError(f"model: unknown name {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
