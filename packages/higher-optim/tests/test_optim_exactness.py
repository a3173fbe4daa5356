"""Every twin equals its torch.optim optimizer, step for step, over the whole option matrix.

The option grid is generated from what the installed torch accepts: every combination of the
bool options its optimizer has, crossed with weight decay and the optimizer's own numeric
variants; combinations torch itself refuses are left out of the grid.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any

import pytest
import torch
from torch.torch_version import TorchVersion

import higher.optim

STEPS = 10
# torch's foreach path of ASGD computed another step size before 2.4: the twin refuses it there
ASGD_FOREACH_FOLLOWED = TorchVersion(torch.__version__) >= "2.4"
FLAGS = ("maximize", "amsgrad", "nesterov", "centered", "decoupled_weight_decay")

# name -> (base options, numeric variants)
BASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "SGD": (
        {"lr": 0.05},
        [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.8, "dampening": 0.3}],
    ),
    "Adam": ({"lr": 0.05, "betas": (0.8, 0.9)}, [{}]),
    "AdamW": ({"lr": 0.05, "betas": (0.8, 0.9)}, [{}]),
    "Adagrad": ({"lr": 0.1}, [{}, {"lr_decay": 0.05, "initial_accumulator_value": 0.1}]),
    "Adadelta": ({"lr": 1.0}, [{}, {"rho": 0.5, "eps": 1e-4}]),
    "Adamax": ({"lr": 0.05}, [{}, {"betas": (0.5, 0.7)}]),
    # torch's foreach path computes ASGD differently from its loop: both are followed (the
    # foreach one where torch computes it as its loop's formula says: 2.4 and later)
    "ASGD": (
        {"lr": 0.05},
        [{}, {"lambd": 0.1, "alpha": 0.5, "t0": 2.0}]
        + ([{"foreach": True, "lambd": 0.1, "t0": 2.0}] if ASGD_FOREACH_FOLLOWED else []),
    ),
    "RMSprop": ({"lr": 0.01}, [{"momentum": 0.0}, {"momentum": 0.5, "alpha": 0.9}]),
    "Rprop": ({"lr": 0.01}, [{}, {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.02)}]),
    "NAdam": ({"lr": 0.05}, [{}, {"momentum_decay": 0.05, "betas": (0.7, 0.9)}]),
    "RAdam": ({"lr": 0.05}, [{}, {"betas": (0.5, 0.6)}]),
    "Adafactor": ({"lr": 0.05}, [{}, {"beta2_decay": -0.5, "d": 0.5, "eps": (1e-3, 1e-3)}]),
}


def torch_options(name: str) -> set[str]:
    cls = getattr(torch.optim, name)
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params"}


def grid() -> list[Any]:
    cases = []
    for name, (base, variants) in BASES.items():
        if not hasattr(torch.optim, name):
            continue  # Adafactor: torch 2.5 and later
        accepted = torch_options(name)
        flags = [f for f in FLAGS if f in accepted]
        for values in itertools.product((False, True), repeat=len(flags)):
            for variant in variants:
                for wd in (0.0, 0.1):
                    options = {**base, **variant, **dict(zip(flags, values, strict=True))}
                    if "weight_decay" in accepted:
                        options["weight_decay"] = wd
                    elif wd:
                        continue
                    try:
                        getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)], **options)
                    except (ValueError, RuntimeError):
                        continue  # torch refuses it (e.g. nesterov without momentum)
                    cases.append(pytest.param(name, options, id=f"{name}-{_id(options)}"))
    return cases


def _id(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items() if k != "lr")


def make_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (4,), (2, 2), (3,), (2,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[2].requires_grad_(False)  # frozen
    for i in (0, 1, 3, 4):
        params[i].requires_grad_()
    return params


def loss_at(params: list[torch.Tensor], k: int, every: int = 3) -> torch.Tensor:
    a, b, c, d, e = params
    x = torch.linspace(-1, 1, 2, dtype=torch.float64) + 0.1 * k
    loss = ((a @ x).tanh() ** 2).sum() + (b * (k + 1.0)).sin().sum() + (c * a[:2]).sum()
    loss = loss + (e * x).cos().sum() * a[0, 0]
    if k % every == 0:  # `d` has a gradient only every third step, so its step count lags
        loss = loss + ((d - 0.5) ** 2).sum()
    return loss


def groups(params: list[torch.Tensor], options: dict[str, Any]) -> list[dict[str, Any]]:
    second: dict[str, Any] = {"params": [params[1], params[3]], "lr": options["lr"] * 0.5}
    if options.get("weight_decay"):
        second["weight_decay"] = 0.05
    # group 0 steps `a` and `e` together (one fused update), beside the frozen `c`
    return [{"params": [params[0], params[2], params[4]]}, second]


def torch_step(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], k: int, every: int = 3
) -> None:
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward(loss_at(params, k, every))
    opt.step()


def follow_torch(
    opt: torch.optim.Optimizer,
    diffopt: higher.optim.DifferentiableOptimizer,
    params: list[torch.Tensor],
    fast: list[torch.Tensor],
    ks: range,
) -> list[torch.Tensor]:
    """Step torch (on `params`) and the twin (from `fast`) side by side on the losses `ks`; the
    weights agree after every step. Returns the twin's last weights."""
    for k in ks:
        torch_step(opt, params, k)
        fast = diffopt.step(loss_at(fast, k), params=fast)
        for ours, theirs in zip(fast, params, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)
    return fast


@pytest.fixture(params=["per-tensor", "fused", "foreach"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way a rule runs: a loop over tensors, one kernel over their concatenation, or (for
    the rules that allow it) one kernel over lists of tensors, each op a foreach op."""
    threshold = 2 if request.param == "fused" else 10**9
    monkeypatch.setattr(higher.optim._kernel, "FUSE_MIN_TENSORS", threshold)
    monkeypatch.setattr(higher.optim._kernel, "FOREACH", request.param == "foreach")
    return str(request.param)


@pytest.mark.parametrize("warm", [0, 3], ids=["fresh", "branched"])
@pytest.mark.parametrize(("name", "options"), grid())
def test_trajectory_equals_torch(
    name: str, options: dict[str, Any], warm: int, kernel_path: str
) -> None:
    params = make_params()
    opt = getattr(torch.optim, name)(groups(params, options), **options)
    for k in range(warm):  # a torch optimizer that already stepped: its state carries over
        torch_step(opt, params, k)
    start = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    diffopt = higher.optim.get_diff_optim(opt, params)  # state is cloned: torch goes on alone
    fast = follow_torch(opt, diffopt, params, start, range(warm, warm + STEPS))
    assert fast[2] is start[2]  # the frozen parameter is never touched
    assert all(f.grad_fn is not None for i, f in enumerate(fast) if i != 2)


class Weights:
    """A functional model in the least form `higher.optim` takes: the fast weights, updated by
    each step (so `diffopt.step(loss)` repeats the last step's plan while nothing changes)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.fast_params = list(params)

    def update_params(self, params: list[torch.Tensor]) -> None:
        self.fast_params = list(params)


@pytest.mark.parametrize("every", [1, 3], ids=["all-stepped", "one-lags"])
@pytest.mark.parametrize(("name", "options"), grid())
def test_steps_of_a_functional_model_equal_torch(
    name: str, options: dict[str, Any], every: int
) -> None:
    """`step(loss)` with the weights in a functional model (the inner loop's form, whose steps
    reuse the last step's checks and plan), with the learning rate of a group changed half-way
    in both optimizers: the weights follow torch's after every step. `every=1`: every weight
    has a gradient at every step (each step repeats the last one's plan); 3: one weight has a
    gradient every third step only."""
    params = make_params()
    opt = getattr(torch.optim, name)(groups(params, options), **options)
    fmodel = Weights([p.detach().clone().requires_grad_(p.requires_grad) for p in params])
    diffopt = higher.optim.get_diff_optim(opt, params, fmodel=fmodel)
    for k in range(STEPS):
        if k == STEPS // 2:  # a change of the options: the next step is planned anew
            for group in (opt.param_groups[1], diffopt.param_groups[1]):
                group["lr"] = options["lr"] * 0.25
        torch_step(opt, params, k, every)
        diffopt.step(loss_at(fmodel.fast_params, k, every))
        for ours, theirs in zip(fmodel.fast_params, params, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flag", ["foreach", "differentiable"])
def test_implementation_flags_are_accepted(flag: str) -> None:
    params = make_params()
    flags: dict[str, Any] = {flag: True}
    opt = torch.optim.Adam(groups(params, {"lr": 0.05}), lr=0.05, **flags)
    reference = torch.optim.Adam(groups(copy.deepcopy(params), {"lr": 0.05}), lr=0.05)
    diffopt = higher.optim.get_diff_optim(opt, params)
    plain = higher.optim.get_diff_optim(
        reference, reference.param_groups[0]["params"] + reference.param_groups[1]["params"]
    )
    assert type(diffopt) is type(plain)
    fast = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ours = diffopt.step(loss_at(fast, 0), params=fast)
    assert ours[0].shape == (3, 2)
    assert not torch.equal(ours[0], fast[0])


def test_asgd_foreach_path_is_followed_or_refused() -> None:
    """torch before 2.4 computed the foreach path's step size as lr / (1 + lambd lr
    step**alpha), for every parameter from the first one's step: the twin refuses that path
    there, and follows it (exactly) where torch fixed it."""
    params = make_params()
    opt = torch.optim.ASGD(params, lr=0.05, lambd=0.1, alpha=0.5, t0=2.0, foreach=True)
    if not ASGD_FOREACH_FOLLOWED:
        with pytest.raises(higher.optim.OptimError, match="foreach=False"):
            higher.optim.get_diff_optim(opt, params).step(loss_at(params, 0), params=params)
        return
    diffopt = higher.optim.get_diff_optim(opt, params)
    fast = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    follow_torch(opt, diffopt, params, fast, range(STEPS))


def _complex_as_real_pairs(name: str) -> bool:
    """Whether the installed torch steps a complex parameter as the pair of reals it views
    (NAdam and RAdam of torch 2.1 ran their formulas in complex arithmetic instead)."""
    if not hasattr(torch.optim, name) or name == "Adafactor":  # torch refuses complex there
        return False
    z = torch.tensor([0.3 - 1.2j, -0.7 + 0.4j], dtype=torch.complex128, requires_grad=True)
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    steps = []
    for p, as_complex in ((z, lambda t: t), (r, torch.view_as_complex)):
        opt = getattr(torch.optim, name)([p], **BASES[name][0])
        for k in range(STEPS):  # RAdam's rectified (nonlinear) steps start at step 6
            opt.zero_grad()
            torch.autograd.backward((as_complex(p) * (k + 1.0) - 1j).abs().pow(3).sum())
            opt.step()
        steps.append(torch.view_as_real(z.detach()) if p is z else r.detach())
    return torch.allclose(steps[0], steps[1], rtol=1e-10, atol=1e-12)


COMPLEX_CASES = [(name, BASES[name][0]) for name in BASES if _complex_as_real_pairs(name)]


@pytest.mark.parametrize(("name", "options"), COMPLEX_CASES, ids=[c[0] for c in COMPLEX_CASES])
def test_complex_parameters_are_real_pairs_as_in_torch(name: str, options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(4)
    z0 = torch.randn(3, generator=gen, dtype=torch.complex128)
    r0 = torch.randn(2, generator=gen, dtype=torch.float64)
    z, r = z0.clone().requires_grad_(), r0.clone().requires_grad_()
    opt = getattr(torch.optim, name)([z, r], **options)
    diffopt = higher.optim.get_diff_optim(opt, [z, r])
    fast = [z0.clone().requires_grad_(), r0.clone().requires_grad_()]

    def loss(params: list[torch.Tensor], k: int) -> torch.Tensor:
        return (params[0] * (k + 1.0) - 1j).abs().pow(2).sum() + (
            params[1] * params[0].real[:2]
        ).sum()

    for k in range(STEPS):
        opt.zero_grad()
        torch.autograd.backward(loss([z, r], k))
        opt.step()
        fast = diffopt.step(loss(fast, k), params=fast)
        assert fast[0].is_complex()
        torch.testing.assert_close(fast[0], z.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast[1], r.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), [c.values for c in grid()[::3]])
def test_tensor_hyperparameters_give_the_same_trajectory(
    name: str, options: dict[str, Any]
) -> None:
    """Every numeric hyperparameter as a tensor that requires grad: the values are unchanged
    (a tensor equal to 0 keeps its term, so its hypergradient exists)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # trainable hyperparameters are default-dtype tensors
    try:
        params = make_params()
        opt = getattr(torch.optim, name)(groups(params, options), **options)
        hyper = higher.optim.get_trainable_opt_params(opt)
        assert "lr" in hyper and all(t.requires_grad for t in hyper["lr"])
        diffopt = higher.optim.get_diff_optim(opt, params, override=hyper)
        fast = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        fast = follow_torch(opt, diffopt, params, fast, range(STEPS))
        (grad,) = torch.autograd.grad(fast[0].sum(), hyper["lr"][0])
        assert torch.isfinite(grad)
    finally:
        torch.set_default_dtype(previous)
