"""Differentiable gradient clipping, as `grad_callback`s."""

from __future__ import annotations

from collections.abc import Callable

import torch

Grads = list[torch.Tensor | None]


def clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> Callable[[Grads], Grads]:
    """A `grad_callback` that rescales the gradients as `torch.nn.utils.clip_grad_norm_` does.

    Out of place and differentiable (the norm stays in the graph); `None` gradients stay None.

    Examples:
        >>> import torch, higher.optim
        >>> clip = higher.optim.clip_grad_norm(1.0)
        >>> [round(x, 4) for x in clip([torch.tensor([3.0, 4.0]), None])[0].tolist()]
        [0.6, 0.8]
    """

    def callback(grads: Grads) -> Grads:
        present = [g for g in grads if g is not None]
        if not present:
            return list(grads)
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in present])
        total = torch.linalg.vector_norm(norms, norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef for g in grads]

    return callback


def clip_grad_value(clip_value: float) -> Callable[[Grads], Grads]:
    """A `grad_callback` that clamps every gradient entry to `[-clip_value, clip_value]`.

    Examples:
        >>> import torch, higher.optim
        >>> higher.optim.clip_grad_value(1.0)([torch.tensor([3.0, -0.5])])[0].tolist()
        [1.0, -0.5]
    """

    def callback(grads: Grads) -> Grads:
        return [None if g is None else g.clamp(-clip_value, clip_value) for g in grads]

    return callback
