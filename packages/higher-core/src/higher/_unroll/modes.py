"""The memory modes of an unroll: what `innerloop_ctx(..., unroll=...)` accepts.

Each mode is a small frozen description; `recompute.py` and `forward.py` run them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from higher._errors import UnrollError, UsageError


@dataclasses.dataclass(frozen=True)
class Full:
    """Keep every step's graph (the default, as higher 0.2.1): fastest, memory grows with the
    activations of every step.

    Examples:
        >>> higher.Full()
        Full()
    """


@dataclasses.dataclass(frozen=True)
class Recompute:
    """Exact meta-gradients at a fraction of the memory: each step's graph is rebuilt during the
    backward pass instead of being kept.

    Only what rebuilds a step is kept: the fast weights and optimizer state every `every` steps,
    the step's closure (its data), its random-number state and buffers. Steps between two kept
    states are run again from the last one (forward only) when the backward pass reaches them:
    memory `O(k/every·|θ| + every·|θ|)` plus one step's activations, for about one more forward
    and gradient per step (`every > 1`: two). Needs the loss as a closure:
    `diffopt.step(closure=lambda: loss_fn(fmodel(x), y))`.

    Args:
        every: keep the weights and state of every `every`-th step (1: every step).
        check: compare each rebuilt step's loss, and a fingerprint of its gradients before
            and after the step's grad_callback, with the first run's, and raise
            `UnrollError` if they differ (a closure that reads a loop variable, a
            grad_callback with a step counter, non-deterministic kernels; NaN equals NaN).
            The closure and the grad_callback run again when a step is rebuilt, so they
            must be pure; with `check=False` nothing verifies it.

    Examples:
        >>> higher.Recompute(every=4)
        Recompute(every=4, check=True)
    """

    every: int = 1
    check: bool = True

    def __post_init__(self) -> None:
        _positive("every", self.every)
        if not isinstance(self.check, bool):
            raise UsageError(f"check must be a bool, got {type(self.check).__name__}")


@dataclasses.dataclass(frozen=True)
class Truncated:
    """Backpropagate through the last `window` steps only (an approximation, as truncated
    backpropagation through time): earlier steps are constants of the meta-gradient.

    Memory `O(window·|θ|)` plus one step's activations, whatever the number of steps; the steps
    in the window are rebuilt during the backward pass as in `Recompute`, so it needs the loss
    as a closure too. Steps count back from the latest one when the backward pass runs.

    Args:
        window: how many of the latest steps the meta-gradient goes through.
        check: as in `Recompute`.

    Examples:
        >>> higher.Truncated(window=10)
        Truncated(window=10, check=True)
    """

    window: int
    check: bool = True

    def __post_init__(self) -> None:
        _positive("window", self.window)
        if not isinstance(self.check, bool):
            raise UsageError(f"check must be a bool, got {type(self.check).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardMode:
    """Exact hypergradients for a few tensors, with memory flat in the number of steps.

    The derivative of the weights (and optimizer state) with respect to each element of
    `wrt` is carried forward through the unroll, one step at a time (Jacobian-vector
    products), so nothing of earlier steps is kept; each step costs about two backward passes
    more per element. A meta-loss's `backward()` then fills `.grad` of the `wrt` tensors.
    Gradients with respect to anything else that requires grad (the model's initial weights
    with `copy_initial_weights=False`, data the loss uses) are refused: use `Recompute`.

    Args:
        wrt: the tensors to differentiate with respect to: hyperparameters given in
            `override` or tensors the loss uses (default: every hyperparameter tensor of the
            optimizer that requires grad).
        max_directions: refuse more elements than this in `wrt` (each costs a backward pass
            per step).

    Examples:
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> higher.ForwardMode(wrt=[lr]).max_directions
        64
    """

    wrt: Sequence[torch.Tensor] | None = None
    max_directions: int = 64

    def __post_init__(self) -> None:
        _positive("max_directions", self.max_directions)
        if self.wrt is None:
            return
        if not isinstance(self.wrt, (list, tuple)):
            raise UsageError(
                f"wrt must be a list of tensors, got {type(self.wrt).__name__} "
                "(wrap one tensor in a list: wrt=[lr])"
            )
        for i, t in enumerate(self.wrt):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise UsageError(f"wrt[{i}] must be a floating-point tensor, got {what}")
            if not t.requires_grad:
                raise UnrollError(
                    f"wrt[{i}] (shape {tuple(t.shape)}) does not require grad: a hypergradient "
                    "is taken with respect to tensors that do (t.requires_grad_())"
                )

    def __repr__(self) -> str:
        wrt = None if self.wrt is None else [tuple(t.shape) for t in self.wrt]
        return f"ForwardMode(wrt={wrt}, max_directions={self.max_directions})"


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise UnrollError(f"{name} must be at least 1, got {value}")


Mode = Full | Recompute | Truncated | ForwardMode

_NAMES: dict[str, Mode] = {"full": Full(), "recompute": Recompute(), "forward": ForwardMode()}


def resolve(unroll: object) -> Mode:
    """The mode `unroll` names: a mode object, or one of the names "full", "recompute",
    "forward"."""
    if isinstance(unroll, (Full, Recompute, Truncated, ForwardMode)):
        return unroll
    if isinstance(unroll, str):
        if unroll in _NAMES:
            return _NAMES[unroll]
        if unroll == "truncated":
            raise UnrollError(
                "a truncated unroll needs its window: unroll=higher.Truncated(window=W)"
            )
        raise UnrollError(
            f"unknown unroll mode {unroll!r}; expected 'full', 'recompute', 'forward', or "
            "higher.Full(), higher.Recompute(every=c), higher.Truncated(window=W), "
            "higher.ForwardMode(wrt=[...])"
        )
    raise UsageError(
        "unroll must be a mode name ('full', 'recompute', 'forward') or a mode object "
        f"(higher.Recompute(...), ...), got {type(unroll).__name__}"
    )
