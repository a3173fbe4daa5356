"""The learned update rule: one small MLP applied to every coordinate of every parameter.

Each coordinate's features are its gradient and three momenta, each divided by the root of a
second-moment average `rms` (so they do not depend on the scale of the loss, as Adam's step does
not), its own value, the log of `rms` (how large its gradients are: what tells a task that wants
long steps from one that wants short ones), and three features of the step count (so the rule can
learn a schedule). The MLP maps
them to a direction `d` and a log step size `s`; the step is

    p <- p - lr * exp(s) * (m / rms + d)

with `m / rms` Adam's direction (the 0.9 momentum over the root second moment, bias-corrected):
with a zero output layer the rule is Adam with a learning rate of `lr * exp(b_s)`, a sane start
for meta-training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from higher.optim import HyperparameterTypeError
from higher.optim.rule import Hyper, Rule, elementwise, flag, some, split_lr, sqrt0

T = torch.Tensor

#: What the MLP sees for each coordinate, in the order of its input.
FEATURES = (
    "grad / rms",
    "momentum(0.5) / rms",
    "momentum(0.9) / rms",
    "momentum(0.99) / rms",
    "param",
    "log(rms) / 5",
    "tanh(step / 10)",
    "tanh(step / 30)",
    "tanh(step / 100)",
)
MOMENTUM_BETAS = (0.5, 0.9, 0.99)
SECOND_MOMENT_BETA = 0.999
EPS = 1e-8
STEP_SCALES = (10.0, 30.0, 100.0)
N_FEATURES = len(FEATURES)
N_OUTPUTS = 2  # direction, log step size
#: The log step size the output bias starts at: exp(2.3) ~ 10, so Adam at 10 * lr.
INITIAL_LOG_STEP = math.log(10.0)


class LearnedState(NamedTuple):
    """Step count, three momenta (`exp_avg_fast`, `exp_avg`, `exp_avg_slow`: betas 0.5, 0.9,
    0.99) and the second moment (`exp_avg_sq`, beta 0.999), as `LearnedOptimizer` names them.

    Examples:
        >>> import torch
        >>> from higher_learned_opt import LEARNED, init_weights
        >>> state = LEARNED.init([torch.ones(3)], {"lr": 1e-3, "weights": init_weights()})
        >>> state.step, state.exp_avg_sq[0].tolist()
        (0, [0.0, 0.0, 0.0])
    """

    step: int
    exp_avg_fast: list[T]
    exp_avg: list[T]
    exp_avg_slow: list[T]
    exp_avg_sq: list[T]


def weight_count(hidden: int) -> int:
    """How many values the weights of an MLP with `hidden` units hold.

    Examples:
        >>> from higher_learned_opt import weight_count
        >>> weight_count(16)  # 16 * 9 + 16 (first layer), 2 * 16 + 2 (output layer)
        194
    """
    return hidden * (N_FEATURES + 1 + N_OUTPUTS) + N_OUTPUTS


def check_weights(weights: object, where: str = "") -> int:
    """Raise `higher.optim.HyperparameterTypeError` unless `weights` is a 1-d floating tensor of
    `weight_count(hidden)` values for some `hidden >= 1`; return that `hidden`."""
    prefix = f"{where}the learned optimizer's 'weights'"
    if not isinstance(weights, torch.Tensor):
        raise HyperparameterTypeError(
            f"{prefix} must be a tensor (use pretrained_weights() or init_weights()), got "
            f"{type(weights).__name__}"
        )
    if not weights.is_floating_point():
        raise HyperparameterTypeError(
            f"{prefix} must be a floating-point tensor, got dtype {weights.dtype}"
        )
    per_unit = N_FEATURES + 1 + N_OUTPUTS
    n = weights.numel()
    if weights.dim() != 1 or n < weight_count(1) or (n - N_OUTPUTS) % per_unit:
        raise HyperparameterTypeError(
            f"{prefix} must be a 1-d tensor of hidden * {per_unit} + {N_OUTPUTS} values (an MLP "
            f"of {N_FEATURES} inputs, `hidden` tanh units and {N_OUTPUTS} outputs, flattened), "
            f"got shape {tuple(weights.shape)}"
        )
    return (n - N_OUTPUTS) // per_unit


def unpack(weights: T, hidden: int) -> tuple[T, T, T, T]:
    """The layers of the flat `weights`: w1 (hidden, F), b1 (hidden,), w2 (2, hidden), b2 (2,)."""
    sizes = [hidden * N_FEATURES, hidden, N_OUTPUTS * hidden, N_OUTPUTS]
    w1, b1, w2, b2 = torch.split(weights, sizes)
    return w1.reshape(hidden, N_FEATURES), b1, w2.reshape(N_OUTPUTS, hidden), b2


def init_weights(hidden: int = 16, seed: int = 0) -> T:
    """Untrained weights (float32): a random first layer, an output layer of small weights and
    the log step-size bias at log(10), so the rule starts as Adam with a learning rate of
    `10 * lr`.

    Examples:
        >>> from higher_learned_opt import init_weights
        >>> w = init_weights(hidden=16, seed=0)
        >>> w.shape, round(w[-1].item(), 4)
        (torch.Size([194]), 2.3026)
    """
    if not (isinstance(hidden, int) and hidden >= 1):
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, N_FEATURES, generator=gen) / math.sqrt(N_FEATURES)
    b1 = torch.zeros(hidden)
    w2 = torch.randn(N_OUTPUTS, hidden, generator=gen) * (0.01 / math.sqrt(hidden))
    b2 = torch.tensor([0.0, INITIAL_LOG_STEP])
    return torch.cat([w1.reshape(-1), b1, w2.reshape(-1), b2])


def check_options(hyper: Hyper, params: Sequence[T]) -> None:
    """The rule's check of a param group's `weights` (the `check` of `LEARNED`): run when a
    twin is made and for every `override`, so bad weights are refused before any step.

    Examples:
        >>> import torch
        >>> from higher_learned_opt._rule import check_options
        >>> try:
        ...     check_options({"weights": torch.ones(3)}, [])
        ... except Exception as err:
        ...     print(type(err).__name__)
        HyperparameterTypeError
    """
    if "weights" in hyper:
        check_weights(hyper["weights"])


def learned_init(params: Sequence[T], hyper: Hyper) -> LearnedState:
    """Zero momenta at step 0 (and the weights checked)."""
    if "weights" in hyper:
        check_weights(hyper["weights"])

    def zeros() -> list[T]:
        return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    return LearnedState(0, zeros(), zeros(), zeros(), zeros())


def step_kernel(
    p: T,
    g: T,
    moments: Sequence[T],
    step: int,
    layers: tuple[T, T, T, T],
    lr: float | T,
) -> tuple[T, tuple[T, T, T, T]]:
    """One step of one tensor (or of a concatenation of many): `step` is the new step count
    (1 at the first step); `layers` as `unpack` returns them. `LearnedOptimizer` and the twin
    both run this, so they agree to the last bit the arithmetic allows."""
    m_fast, m_mid, m_slow, v = moments
    b_fast, b_mid, b_slow = MOMENTUM_BETAS
    m_fast = torch.lerp(m_fast, g, 1 - b_fast)
    m_mid = torch.lerp(m_mid, g, 1 - b_mid)
    m_slow = torch.lerp(m_slow, g, 1 - b_slow)
    v = torch.addcmul(v * SECOND_MOMENT_BETA, g, g, value=1 - SECOND_MOMENT_BETA)
    rms = sqrt0(v / (1 - SECOND_MOMENT_BETA**step)) + EPS
    adam = m_mid / ((1 - b_mid**step) * rms)
    x = torch.stack(
        [
            g / rms,
            m_fast / ((1 - b_fast**step) * rms),
            adam,
            m_slow / ((1 - b_slow**step) * rms),
            p,
            torch.log(rms) / 5,
        ],
        dim=-1,
    )
    w1, b1, w2, b2 = (layer.to(p.dtype) for layer in layers)
    clock = torch.tensor([math.tanh(step / s) for s in STEP_SCALES], dtype=p.dtype)
    n_coord = N_FEATURES - len(STEP_SCALES)
    # the step features are the same for every coordinate: folded into the hidden bias
    bias = b1 + w1[:, n_coord:] @ clock
    hidden = torch.tanh(x @ w1[:, :n_coord].transpose(0, 1) + bias)
    out = hidden @ w2.transpose(0, 1) + b2
    direction, log_step = out[..., 0], out[..., 1]
    new_p = p - lr * torch.exp(log_step) * (adam + direction)
    return new_p, (m_fast, m_mid, m_slow, v)


def learned_update(
    params: Sequence[T], grads: Sequence[T], state: LearnedState, hyper: Hyper
) -> tuple[list[T], LearnedState]:
    """One step of the learned rule, out of place; `lr` and `weights` may require grad.

    Examples:
        >>> import torch
        >>> from higher_learned_opt import LEARNED, init_weights
        >>> hyper = {"lr": 0.01, "weights": init_weights(), "maximize": False}
        >>> p, g = torch.ones(2), torch.tensor([1.0, -1.0])
        >>> (new,), state = LEARNED.update([p], [g], LEARNED.init([p], hyper), hyper)
        >>> state.step, [round(v, 2) for v in new.tolist()]  # Adam's first step, at 10 * lr
        (1, [0.9, 1.1])
    """
    hidden = check_weights(hyper["weights"])
    layers = unpack(hyper["weights"], hidden)
    lr, lrs = split_lr(hyper)
    maximize = flag(LEARNED, hyper, "maximize")
    step = state.step + 1

    def kernel(
        p: T, g: T, m_fast: T, m_mid: T, m_slow: T, v: T, lr_t: T | None
    ) -> tuple[T, T, T, T, T]:
        g = -g if maximize else g
        new_p, moments = step_kernel(
            p, g, (m_fast, m_mid, m_slow, v), step, layers, lr if lr_t is None else lr_t
        )
        return (new_p, *moments)

    new_p, m_fast, m_mid, m_slow, v = elementwise(
        kernel, params, grads, state.exp_avg_fast, state.exp_avg, state.exp_avg_slow,
        state.exp_avg_sq, lrs,
    )  # fmt: skip
    return some(new_p), LearnedState(step, some(m_fast), some(m_mid), some(m_slow), some(v))


LEARNED = Rule(
    name="LearnedOptimizer",
    state_type=LearnedState,
    init=learned_init,
    update=learned_update,
    hypers=("lr",),
    flags={"maximize": False},
    # one flat tensor of MLP weights, read whole: not a hyperparameter of one value per element
    extra=("weights",),
    check=check_options,
)
