"""The architecture registry: name -> builder, and each family's default activation (its paper's).

Its own module so that ``config`` (which validates names and resolves defaults) and ``factory``
(which builds) both import it and never each other."""
from __future__ import annotations

from typing import Callable

_ARCHS: dict[str, Callable] = {}
_DEFAULT_ACTIVATIONS: dict[str, str] = {}


def register_arch(name: str, default_activation: str = "relu6"):
    """Decorator: register ``builder(config) -> nn.Module`` as ``name``; ``default_activation`` is what
    ``ModelConfig(arch=name)`` uses when no activation is given (the family paper's)."""
    def decorator(builder: Callable) -> Callable:
        _ARCHS[name] = builder
        _DEFAULT_ACTIVATIONS[name] = default_activation
        return builder
    return decorator


def arch_names() -> tuple[str, ...]:
    return tuple(_ARCHS)


def default_activation(arch: str) -> str:
    return _DEFAULT_ACTIVATIONS[arch]


def get_builder(arch: str) -> Callable:
    return _ARCHS[arch]
