"""The structural types `higher.optim` sees: a functional model, a gradient callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

import torch

#: What `grad_callback` receives and returns: one gradient (or None) per parameter.
GradCallback: TypeAlias = "Callable[[list[torch.Tensor | None]], Sequence[torch.Tensor | None]]"


@runtime_checkable
class FunctionalModel(Protocol):
    """What a differentiable optimizer needs of a functional model: its current fast weights.

    `higher.patch.monkeypatch(module)` returns one; any object with these two members works.

    Examples:
        >>> import torch, higher.optim
        >>> class Weights:
        ...     def __init__(self) -> None:
        ...         self.fast_params = [torch.zeros(2, requires_grad=True)]
        ...     def update_params(self, params: list[torch.Tensor]) -> None:
        ...         self.fast_params = list(params)
        >>> isinstance(Weights(), higher.optim.FunctionalModel)
        True
    """

    @property
    def fast_params(self) -> Sequence[torch.Tensor] | None: ...

    def update_params(self, params: list[torch.Tensor]) -> None: ...
