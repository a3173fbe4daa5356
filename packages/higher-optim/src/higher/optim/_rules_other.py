"""ASGD, Rprop and Adafactor as pure rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.torch_version import TorchVersion

from ._errors import OptimError
from ._kernel import compiling, elementwise, is_zero, some
from ._rule import Hyper, Rule, flag, split_lr
from ._rules_adam_variants import scalar_dtype

T = torch.Tensor


def _zeros(params: Sequence[T]) -> list[T]:
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


class ASGDState(NamedTuple):
    """Step count, the step size `eta` and averaging weight `mu` (0-d, in torch's scalar dtype),
    and the running average `ax` of the parameters."""

    step: int
    eta: T
    mu: T
    ax: list[T]


def asgd_init(params: Sequence[T], hyper: Hyper) -> ASGDState:
    """`eta` starts at `lr`, `mu` at 1."""
    lr = hyper["lr"]
    eta = torch.as_tensor(lr).to(scalar_dtype()) if isinstance(lr, T) else None
    if eta is None:
        eta = torch.tensor(float(lr), dtype=scalar_dtype())
    return ASGDState(0, eta, torch.ones((), dtype=scalar_dtype()), _zeros(params))


# Before torch 2.4 the foreach path of ASGD computed the next step size as
# lr / (1 + lambd lr step**alpha) (not its loop's lr / (1 + lambd lr step)**alpha) and gave every
# parameter of a group the first one's; torch 2.4 fixed both. That path is not followed.
_FOREACH_ETA_FIXED = TorchVersion(torch.__version__) >= "2.4"


def _foreach_path(hyper: Hyper, params: Sequence[T]) -> bool:
    """Whether torch takes its foreach (multi-tensor) path for these parameters: asked for, or
    left to torch, which takes it where foreach kernels exist (CUDA) unless differentiable."""
    foreach = hyper.get("foreach")
    if foreach is None:
        native = all(p.device.type in ("cuda", "xpu") for p in params)
        foreach = native and not hyper.get("differentiable", False)
    if foreach and not _FOREACH_ETA_FIXED:
        raise OptimError(
            f"ASGD's foreach path in torch {torch.__version__} computes its step size as lr / (1 + "
            "lambd*lr*step**alpha), not as its own per-tensor loop and the ASGD paper do, and "
            "gives every parameter the first one's (fixed in torch 2.4): the twin does not "
            "follow it. Build the ASGD with foreach=False, or use torch >= 2.4"
        )
    return bool(foreach)


def asgd_update(
    params: Sequence[T], grads: Sequence[T], state: ASGDState, hyper: Hyper
) -> tuple[list[T], ASGDState]:
    """One step of `torch.optim.ASGD`, out of place (`lr` reaches the step through `eta`).

    torch's two paths compute ASGD differently (about 1e-8 apart, relative, after a few steps):
    the per-tensor loop decays then steps, `p (1 - lambd eta) - eta g`, and computes the next
    `eta` from the step count as a Python float; the foreach path steps once, `p - eta (g +
    lambd p)`, always averages, and computes `eta` in the step count's dtype. The twin follows
    the path torch takes for the same parameters and options (before torch 2.4 the foreach path
    computed another step size: refused there)."""
    lr = hyper["lr"]
    lambd, alpha, t0, wd = hyper["lambd"], hyper["alpha"], hyper["t0"], hyper["weight_decay"]
    maximize = flag(ASGD, hyper, "maximize")
    foreach = _foreach_path(hyper, params)
    step = state.step + 1
    # torch reads eta and mu back from its scalar dtype as Python floats (float64)
    eta = state.eta.to(torch.float64)
    # torch averages once mu moves off 1; under torch.compile the test stays a tensor
    averaging = state.mu != 1
    traced = compiling()
    average = foreach or traced or bool(averaging)

    def kernel(p: T, g: T, ax: T) -> tuple[T, T]:
        g = -g if maximize else g
        if not is_zero(wd):
            g = g + wd * p
        if foreach:
            p = p - (g + lambd * p) * eta
        else:
            p = p * (1 - lambd * eta)
            p = p - eta * g
        if traced and not foreach:
            return p, torch.where(averaging, ax + (p - ax) * state.mu, p)
        ax = ax + (p - ax) * state.mu if average else p
        return p, ax

    new_p, ax = elementwise(kernel, params, grads, state.ax)
    dtype = state.eta.dtype
    if foreach:  # eta from the step count as a tensor of the state's dtype
        count = torch.tensor(float(step), dtype=dtype)
        new_eta: T | float = lr / ((1 + lambd * lr * count) ** alpha)
    else:
        new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    new_mu = 1 / torch.clamp(step - torch.as_tensor(t0, dtype=torch.float64), min=1)
    eta_t = new_eta.to(dtype) if isinstance(new_eta, T) else torch.tensor(new_eta, dtype=dtype)
    return some(new_p), ASGDState(step, eta_t, new_mu.to(state.mu.dtype), some(ax))


ASGD = Rule(
    name="ASGD",
    state_type=ASGDState,
    init=asgd_init,
    update=asgd_update,
    hypers=("lr", "lambd", "alpha", "t0", "weight_decay"),
    flags={"maximize": False},
    scalar_state=("eta", "mu"),
    per_param_lr=False,
    per_element=("weight_decay",),  # lr, lambd, alpha and t0 make eta and mu, one value each
)


class RpropState(NamedTuple):
    """Step count, previous (masked) gradient and per-entry step sizes."""

    step: int
    prev: list[T]
    step_size: list[T]


def rprop_init(params: Sequence[T], hyper: Hyper) -> RpropState:
    """Step sizes start at `lr` (a tensor `lr` stays differentiable)."""
    lr, lrs = split_lr(hyper)
    if lrs is None:
        lrs = [lr] * len(params)
    # a complex entry is two real ones: both halves start at lr (as torch does)
    sizes = [
        torch.ones_like(p) * (r * (1 + 1j) if p.is_complex() else r)
        for p, r in zip(params, lrs, strict=True)
    ]
    return RpropState(0, _zeros(params), sizes)


def rprop_update(
    params: Sequence[T], grads: Sequence[T], state: RpropState, hyper: Hyper
) -> tuple[list[T], RpropState]:
    """One step of `torch.optim.Rprop`, out of place."""
    etaminus, etaplus = hyper["etas"][0], hyper["etas"][1]
    size_min, size_max = hyper["step_sizes"][0], hyper["step_sizes"][1]
    maximize = flag(RPROP, hyper, "maximize")

    def kernel(p: T, g: T, prev: T, size: T) -> tuple[T, T, T]:
        g = -g if maximize else g
        sign = (g * prev).sign()
        one = torch.ones_like(size)
        factor = torch.where(sign > 0, one * etaplus, torch.where(sign < 0, one * etaminus, one))
        size = size * factor
        size = torch.minimum(torch.maximum(size, one * size_min), one * size_max)
        g = torch.where(sign < 0, torch.zeros_like(g), g)
        return p - g.sign() * size, g, size

    new_p, prev, size = elementwise(kernel, params, grads, state.prev, state.step_size)
    return some(new_p), RpropState(state.step + 1, some(prev), some(size))


RPROP = Rule(
    name="Rprop",
    state_type=RpropState,
    init=rprop_init,
    update=rprop_update,
    hypers=("lr",),
    pairs=("etas", "step_sizes"),
    flags={"maximize": False},
    per_element=("lr", "etas", "step_sizes"),
)


class AdafactorState(NamedTuple):
    """Step count; factored second moments (`row_var`, `col_var`) for matrices, `variance` for
    vectors (None where a parameter has the other kind)."""

    step: int
    row_var: list[T | None]
    col_var: list[T | None]
    variance: list[T | None]


def adafactor_init(params: Sequence[T], hyper: Hyper) -> AdafactorState:
    """Zero moments at step 0, factored for parameters of 2 or more dimensions."""
    rows: list[T | None] = []
    cols: list[T | None] = []
    variances: list[T | None] = []
    for p in params:
        if p.dim() > 1:
            rows.append(p.new_zeros((*p.shape[:-1], 1)))
            cols.append(p.new_zeros((*p.shape[:-2], 1, p.shape[-1])))
            variances.append(None)
        else:
            rows.append(None)
            cols.append(None)
            variances.append(torch.zeros_like(p))
    return AdafactorState(0, rows, cols, variances)


def adafactor_update(
    params: Sequence[T], grads: Sequence[T], state: AdafactorState, hyper: Hyper
) -> tuple[list[T], AdafactorState]:
    """One step of `torch.optim.Adafactor`, out of place (not elementwise: one tensor at a time).

    Where torch reads a norm back as a Python number, the twin keeps it a tensor, so the step
    stays differentiable in the parameters.
    """
    lr, lrs = split_lr(hyper)
    eps1_opt, eps2 = hyper["eps"][0], hyper["eps"][1]
    d, beta2_decay, wd = hyper["d"], hyper["beta2_decay"], hyper["weight_decay"]
    maximize = flag(ADAFACTOR, hyper, "maximize")
    step = state.step + 1
    # step ** x, not float(step) ** x: the same for an int, and a tensor count (a compiled
    # loop's) stays a tensor
    one_minus_beta2 = step**beta2_decay
    inv_sqrt_step = 1 / (step**0.5)
    new_params: list[T] = []
    none: list[T | None] = [None] * len(params)
    rows = none if state.row_var is None else list(state.row_var)
    cols = list(none) if state.col_var is None else list(state.col_var)
    variances = list(none) if state.variance is None else list(state.variance)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p.is_complex():
            raise OptimError("Adafactor does not support complex parameters (nor does torch)")
        step_lr = lr if lrs is None else lrs[i]
        g = -g if maximize else g
        eps1 = torch.finfo(p.dtype).eps if eps1_opt is None else eps1_opt
        scale = torch.clamp(p.norm(2) / (p.numel() ** 0.5), min=eps2)
        if isinstance(step_lr, T):
            rho_t: T | float = torch.clamp(step_lr, max=inv_sqrt_step)
        elif isinstance(inv_sqrt_step, T):  # a tensor count: as torch's float, in scale's dtype
            rho_t = torch.clamp(inv_sqrt_step, max=step_lr).to(scale.dtype)
        else:
            rho_t = min(step_lr, inv_sqrt_step)
        step_size = scale * rho_t
        if not is_zero(wd):
            p = p * (1 - step_lr * wd)
        row, col = rows[i], cols[i]
        if g.dim() > 1:
            assert row is not None and col is not None
            row_mean = (g * g).sum(dim=-1, keepdim=True) / g.size(-1)
            row = row + (row_mean - row) * one_minus_beta2
            col_mean = (g * g).sum(dim=-2, keepdim=True) / g.size(-2)
            col = col + (col_mean - col) * one_minus_beta2
            estimate = (row @ col) / torch.clamp(row.mean(dim=-2, keepdim=True), min=eps1)
            rows[i], cols[i] = row, col
        else:
            variance = variances[i]
            assert variance is not None
            variance = variance + (g * g - variance) * one_minus_beta2
            estimate = variance
            variances[i] = variance
        update = torch.clamp(estimate, min=eps1 * eps1).rsqrt() * g
        denom = torch.clamp(update.norm(2) / ((update.numel() ** 0.5) * d), min=1.0)
        new_params.append(p - (step_size / denom) * update)
    return new_params, AdafactorState(step, rows, cols, variances)


ADAFACTOR = Rule(
    name="Adafactor",
    state_type=AdafactorState,
    init=adafactor_init,
    update=adafactor_update,
    hypers=("lr", "beta2_decay", "d", "weight_decay"),
    flags={"maximize": False},
    extra=("eps",),
    # d bounds and eps clamps statistics of a whole tensor; beta2_decay weighs factored moments
    per_element=("lr", "weight_decay"),
)
