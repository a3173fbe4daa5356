"""The 0.2.1 contract and what users asked for: recipe subclasses, fmodels, create_diff_optim,
trainable hyperparameters, callbacks, first-order steps, state copy-back, schedulers, errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import higher.optim


def net_and_data() -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net.double()
    x = torch.randn(8, 3, dtype=torch.float64)
    return net, x, x.sum(1, keepdim=True).sin()


class MySGD(torch.optim.Optimizer):
    """A torch optimizer unknown to higher (plain SGD written by a user)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})


class DifferentiableMySGD(higher.optim.DifferentiableOptimizer):
    """Written exactly as the 0.2.1 README recipe says."""

    def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
        zipped = zip(self.param_groups, grouped_grads)
        for group_idx, (group, grads) in enumerate(zipped):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                state["calls"] = state.get("calls", 0) + 1
                group["params"][p_idx] = p - group["lr"] * g


def test_readme_recipe_subclass_and_register() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = MySGD([w], lr=0.25)
    with pytest.raises(higher.optim.UnsupportedOptimizerError, match="MySGD"):
        higher.optim.get_diff_optim(opt, [w])
    higher.optim.register_optim(MySGD, DifferentiableMySGD)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert type(diffopt) is DifferentiableMySGD
    (new,) = diffopt.step((w**2).sum(), params=[w])
    assert new.tolist() == [0.5, 1.0]
    assert diffopt.state[0][0]["calls"] == 1


def test_fmodel_is_updated_and_meta_gradient_flows() -> None:
    import higher.patch  # test-only: higher.optim itself never imports it

    net, x, y = net_and_data()
    fmodel = higher.patch.monkeypatch(net, copy_initial_weights=False)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    diffopt = higher.optim.get_diff_optim(opt, net.parameters(), fmodel=fmodel)
    for _ in range(3):
        new = diffopt.step(((fmodel(x) - y) ** 2).mean())
        assert all(a is b for a, b in zip(new, fmodel.fast_params, strict=True))
    torch.autograd.backward(((fmodel(x) - y) ** 2).mean())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_step_with_model_subset_keeps_other_params() -> None:
    net, x, y = net_and_data()
    params = list(net.parameters())
    opt = torch.optim.SGD(net[2].parameters(), lr=0.1)  # only the head
    diffopt = higher.optim.get_diff_optim(opt, params)
    fast = [p.detach().clone().requires_grad_() for p in params]
    out = torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), fast)), (x,))
    new = diffopt.step(((out - y) ** 2).mean(), params=fast)
    assert new[0] is fast[0] and new[1] is fast[1]
    assert not torch.equal(new[2], fast[2])


def test_create_diff_optim_with_param_group_dicts() -> None:
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    diffopt = higher.optim.create_diff_optim(
        torch.optim.SGD,
        {"lr": 0.1},
        params=[{"params": [a]}, {"params": [b], "lr": 0.5}],  # type: ignore[arg-type]
    )
    new_a, new_b = diffopt.step((a**2).sum() + (b**2).sum(), params=[a, b])
    assert new_a.tolist() == pytest.approx([0.8, 0.8])
    assert new_b.tolist() == pytest.approx([0.0, 0.0, 0.0])
    with pytest.raises(higher.optim.OptimError, match="params= or an fmodel"):
        higher.optim.create_diff_optim(torch.optim.SGD, {"lr": 0.1})


def test_trainable_opt_params_round_trip_keeps_bools() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.1, amsgrad=True)
    hyper = higher.optim.get_trainable_opt_params(opt)
    assert "amsgrad" not in hyper and "maximize" not in hyper
    assert hyper["lr"][0].requires_grad and isinstance(hyper["betas"][0], tuple)
    diffopt = higher.optim.get_diff_optim(opt, [w], override=hyper)
    (new,) = diffopt.step((w**2).sum(), params=[w])
    assert torch.autograd.grad(new.sum(), hyper["lr"][0])[0].item() != 0
    with torch.no_grad():
        hyper["lr"][0].fill_(0.5)
        hyper["betas"][0][0].fill_(0.8)
    higher.optim.apply_trainable_opt_params(opt, hyper)
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and isinstance(group["lr"], float)
    assert group["betas"][0] == pytest.approx(0.8) and isinstance(group["betas"][0], float)
    assert group["amsgrad"] is True
    assert group["weight_decay"] == 0 and isinstance(group["weight_decay"], int)


def test_override_persists_and_per_step_override() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    diffopt = higher.optim.get_diff_optim(opt, [w], override={"lr": [0.5]})
    (w1,) = diffopt.step(w.sum(), params=[w])
    assert w1.item() == 0.5
    (w2,) = diffopt.step(w1.sum(), params=[w1], override={"lr": [0.25]})
    assert w2.item() == 0.25
    assert diffopt.param_groups[0]["lr"] == 0.25


def test_grad_callback_per_step_wins() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    double = lambda gs: [None if g is None else 2 * g for g in gs]  # noqa: E731
    triple = lambda gs: [None if g is None else 3 * g for g in gs]  # noqa: E731
    diffopt = higher.optim.get_diff_optim(opt, [w], grad_callback=double)
    assert diffopt.step(w.sum(), params=[w])[0].tolist() == [-1.0, -1.0]
    assert diffopt.step(w.sum(), params=[w], grad_callback=triple)[0].tolist() == [-2.0, -2.0]


def test_clip_grad_norm_matches_torch_and_is_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 2, generator=gen, dtype=torch.float64) * 4 for _ in range(2)]
    leaves = [g.clone().requires_grad_() for g in grads]
    for g in leaves:
        g.grad = g.detach().clone()
    torch.nn.utils.clip_grad_norm_(leaves, max_norm=1.0)
    clipped = higher.optim.clip_grad_norm(1.0)([*grads, None])
    assert clipped[2] is None
    for ours, theirs in zip(clipped, leaves, strict=False):
        assert ours is not None and theirs.grad is not None
        torch.testing.assert_close(ours, theirs.grad, rtol=1e-12, atol=1e-14)
    x = grads[0].clone().requires_grad_()
    out = higher.optim.clip_grad_norm(1.0)([x])[0]
    assert out is not None

    def clipped_one(t: torch.Tensor) -> torch.Tensor:
        result = higher.optim.clip_grad_norm(1.0)([t])[0]
        assert result is not None
        return result

    assert torch.autograd.gradcheck(clipped_one, (x,))
    value = higher.optim.clip_grad_value(0.5)([grads[0], None])
    assert value[1] is None and value[0] is not None and value[0].abs().max() == 0.5


def test_first_order_keeps_frozen_params_frozen() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = torch.optim.Adam([a, frozen], lr=0.1)
    diffopt = higher.optim.get_diff_optim(opt, [a, frozen], track_higher_grads=False)
    params: list[torch.Tensor] = [a, frozen]
    for _ in range(3):
        params = diffopt.step((params[0] * params[1]).sum(), params=params)
    assert params[0].requires_grad and params[0].is_leaf
    assert not params[1].requires_grad
    assert diffopt.state[0][0]["exp_avg"].grad_fn is None
    assert not diffopt.track_higher_grads


def test_copy_state_back_continues_like_uninterrupted_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, generator=gen, dtype=torch.float64)

    def loss(w: torch.Tensor, k: int) -> torch.Tensor:
        return ((w - k) ** 2).sum() + w.prod()

    ref = w0.clone().requires_grad_()
    ref_opt = torch.optim.Adam([ref], lr=0.1, amsgrad=True)
    for k in range(6):
        ref_opt.zero_grad()
        torch.autograd.backward(loss(ref, k))
        ref_opt.step()
    w = w0.clone().requires_grad_()
    opt = torch.optim.Adam([w], lr=0.1, amsgrad=True)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    params: list[torch.Tensor] = [w]
    for k in range(3):
        params = diffopt.step(loss(params[0], k), params=params)
    diffopt.copy_state_to(opt, copy_params=True)
    assert opt.state[w]["step"].dtype == torch.get_default_dtype()
    for k in range(3, 6):
        opt.zero_grad()
        torch.autograd.backward(loss(w, k))
        opt.step()
    torch.testing.assert_close(w, ref, rtol=1e-10, atol=1e-12)


def test_torch_lr_scheduler_drives_diff_optimizer() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    ref = copy.deepcopy(w)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    params: list[torch.Tensor] = [w]
    for _ in range(5):
        ref_opt.zero_grad()
        torch.autograd.backward((ref**2).sum())
        ref_opt.step()
        ref_sched.step()
        params = diffopt.step((params[0] ** 2).sum(), params=params)
        opt.step()  # no grads: only keeps the scheduler's step-order check quiet
        sched.step()
        diffopt.sync_hyperparameters(opt)
    torch.testing.assert_close(params[0], ref.detach(), rtol=1e-10, atol=1e-12)


def test_differentiable_schedule_through_per_step_override() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    decay = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1), [w])
    params: list[torch.Tensor] = [w]
    for k in range(3):
        params = diffopt.step(
            (params[0] ** 2).sum(), params=params, override={"lr": [0.1 * decay**k]}
        )
    (grad,) = torch.autograd.grad((params[0] ** 2).sum(), decay)
    # w_k = w * (1 - 0.2) (1 - 0.2 d) (1 - 0.2 d^2): differentiate by hand
    d = 0.5
    f = (1 - 0.2) * (1 - 0.2 * d) * (1 - 0.2 * d * d)
    df = (1 - 0.2) * (-0.2 * (1 - 0.2 * d * d) + (1 - 0.2 * d) * (-0.4 * d))
    expected = 2 * f * df * (1.0 + 4.0)
    assert grad.item() == pytest.approx(expected, rel=1e-12)


def test_subclass_resolves_to_parent_twin() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    w = torch.nn.Parameter(torch.ones(1))
    assert type(higher.optim.get_diff_optim(MyAdam([w]), [w])) is higher.optim.DifferentiableAdam


def test_override_count_message_fits_the_groups() -> None:
    """One param group: the message asks for one value, and where the count equals the number
    of parameters it shows the per-parameter form; several groups: one or one per group."""
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))
    one = torch.optim.SGD([a, b], lr=0.1)
    with pytest.raises(higher.optim.OptimError) as info:
        higher.optim.get_diff_optim(one, [a, b], override={"lr": [0.1, 0.2]})
    assert str(info.value) == (
        "override['lr'] has 2 values; expected 1, the value for the optimizer's single param "
        "group; for one learning rate per parameter, put them in one list: override={'lr': "
        "[[lr_0, lr_1]]} (one tensor per parameter: 0-d, or shaped like its parameter for one "
        "rate per element)"
    )
    with pytest.raises(higher.optim.OptimError) as info:
        higher.optim.get_diff_optim(one, [a, b], override={"momentum": [0.1, 0.2, 0.3]})
    assert str(info.value) == (
        "override['momentum'] has 3 values; expected 1, the value for the optimizer's single "
        "param group"
    )
    two = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(higher.optim.OptimError, match=r"expected 1 \(all groups\) or 2 \(one per"):
        higher.optim.get_diff_optim(two, [a, b], override={"lr": [0.1, 0.2, 0.3]})
    # the form the message shows is accepted
    rates = [torch.full((2, 3), 0.5), torch.tensor(0.25)]
    diffopt = higher.optim.get_diff_optim(one, [a, b], override={"lr": [rates]})
    new_a, new_b = diffopt.step(a.sum() + b.sum(), params=[a, b])
    assert new_a.tolist() == [[0.5] * 3] * 2 and new_b.tolist() == [0.75] * 3


@pytest.mark.parametrize("name", ["LBFGS", "SparseAdam"])
def test_optimizers_without_twin_name_the_type(name: str) -> None:
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(higher.optim.UnsupportedOptimizerError, match=name):
        higher.optim.get_diff_optim(getattr(torch.optim, name)([w]), [w])


def test_unknown_option_is_refused() -> None:
    class SGDWithLookahead(torch.optim.SGD):
        def __init__(self, params: Any, lr: float, lookahead: int = 5) -> None:
            super().__init__(params, lr=lr)
            self.defaults["lookahead"] = lookahead
            for group in self.param_groups:
                group["lookahead"] = lookahead

    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(higher.optim.UnsupportedOptionError, match="lookahead"):
        higher.optim.get_diff_optim(SGDWithLookahead([w], lr=0.1), [w])


def test_bad_input_errors() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    other = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    with pytest.raises(higher.optim.OptimError, match="scalar"):
        diffopt.step(w * 2, params=[w])
    with pytest.raises(higher.optim.OptimError, match=r"params="):
        diffopt.step(w.sum())
    with pytest.raises(higher.optim.OptimError, match="expected 1"):
        diffopt.step(w.sum(), params=[w, w])
    with pytest.raises(higher.optim.OptimError, match="shape"):
        diffopt.step(w.sum(), params=[torch.ones(3, requires_grad=True)])
    with pytest.raises(higher.optim.OptimError, match="not among reference_params"):
        higher.optim.get_diff_optim(opt, [other])
    with pytest.raises(higher.optim.OptimError, match="expected 1, the value for the optimizer's"):
        higher.optim.get_diff_optim(opt, [w], override={"lr": [0.1, 0.2]})
    with pytest.raises(higher.optim.OptimError, match="'speed'"):
        higher.optim.get_diff_optim(opt, [w], override={"speed": [0.1]})
    with pytest.raises(higher.optim.HyperparameterTypeError, match="'lr'"):
        higher.optim.get_diff_optim(opt, [w], override={"lr": ["fast"]})
    with pytest.raises(higher.optim.HyperparameterTypeError, match="list of values"):
        higher.optim.get_diff_optim(opt, [w], override={"lr": 0.1})  # type: ignore[dict-item]
    with pytest.raises(higher.optim.HyperparameterTypeError, match="'nesterov'"):
        higher.optim.get_diff_optim(opt, [w], override={"nesterov": [1]})
    with pytest.raises(higher.optim.OptimError, match="does not require grad"):
        diffopt.step(torch.tensor(1.0), params=[w])
    with pytest.raises(higher.optim.ArgumentTypeError, match="unexpected keyword"):
        diffopt.step(w.sum(), params=[w], unknown=1)
    with pytest.raises(higher.optim.ArgumentTypeError, match=r"torch\.optim\.Optimizer"):
        higher.optim.get_diff_optim("SGD", [w])  # type: ignore[arg-type]


def test_errors_share_one_base_and_the_builtins() -> None:
    import higher.patch

    assert higher.optim.HigherError is higher.patch.HigherError
    assert issubclass(higher.optim.OptimError, ValueError)
    assert issubclass(higher.optim.UnsupportedOptimizerError, higher.optim.HigherError)
    assert issubclass(higher.optim.HyperparameterTypeError, TypeError)


def test_functional_api_matches_the_class() -> None:
    from higher.optim import functional as F

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    tx = F.nadam(lr=0.05, weight_decay=0.1)
    state = tx.init([w])
    opt = torch.optim.NAdam([w], lr=0.05, weight_decay=0.1)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    params, fast = [w], [w]
    for _ in range(4):
        (g,) = torch.autograd.grad((params[0] ** 3).sum(), params, create_graph=True)
        params, state = tx.step([g], state, params)
        fast = diffopt.step((fast[0] ** 3).sum(), params=fast)
    assert state.step == 4
    torch.testing.assert_close(params[0], fast[0], rtol=1e-12, atol=0)


def test_hyperparameter_tensor_given_directly_to_the_torch_optimizer() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, foreach=False)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert diffopt.param_groups[0]["lr"] is lr
    params: list[torch.Tensor] = [w]
    for _ in range(3):
        params = diffopt.step((params[0] ** 2).sum(), params=params)
    first = torch.autograd.grad(params[0][0], lr, retain_graph=True)[0]
    second = torch.autograd.grad(params[0][1], lr)[0]
    # Adam moves each entry by about lr per step against the gradient: d/dlr ~ -3 sign(w)
    assert first.item() == pytest.approx(-3.0, abs=0.05)
    assert second.item() == pytest.approx(3.0, abs=0.05)


def test_scalar_state_given_as_numbers_is_accepted() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.NAdam([w], lr=0.1)
    torch.autograd.backward((w**2).sum())
    opt.step()
    reference = higher.optim.get_diff_optim(opt, [w])
    opt.state[w]["mu_product"] = float(opt.state[w]["mu_product"])  # as an older torch kept it
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert isinstance(diffopt.state[0][0]["mu_product"], torch.Tensor)
    start = [w.detach().clone().requires_grad_()]
    ours = diffopt.step((start[0] ** 2).sum(), params=start)
    theirs = reference.step((start[0] ** 2).sum(), params=start)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=0)


FACTORIES = [
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "ASGD",
    "RMSprop",
    "Rprop",
    "NAdam",
    "RAdam",
    "Adafactor",
]


@pytest.mark.parametrize("name", [n for n in FACTORIES if hasattr(torch.optim, n)])
def test_functional_factories_default_like_torch(name: str) -> None:
    """`functional.<name>(lr=...)` with its defaults steps exactly as `torch.optim.<Name>`."""
    from higher.optim import functional as F

    tx = getattr(F, name.lower())(lr=0.05)
    gen = torch.Generator().manual_seed(5)
    start = [
        torch.randn(3, 2, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
    ]
    params = [p.clone().requires_grad_() for p in start]
    opt = getattr(torch.optim, name)(params, lr=0.05)
    fast = [p.clone().requires_grad_() for p in start]
    state = tx.init(fast)

    def loss(ps: list[torch.Tensor], k: int) -> torch.Tensor:
        return (ps[0].sum(1) * ps[1][:3] - k).pow(2).sum() + ps[1].sin().sum()

    for k in range(6):
        opt.zero_grad()
        torch.autograd.backward(loss(params, k))
        opt.step()
        grads = list(torch.autograd.grad(loss(fast, k), fast, create_graph=True))
        fast, state = tx.step(grads, state, fast)
        for ours, theirs in zip(fast, params, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


STATE_MAKERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=0.1),
    "ASGD": lambda ps: torch.optim.ASGD(ps, lr=0.1, t0=2),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=0.1),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=0.1),
}
if hasattr(torch.optim, "Adafactor"):
    STATE_MAKERS["Adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=0.1)


def _types(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.dtype, v.device, tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v)
        for k, v in state.items()
    }


@pytest.mark.parametrize("name", STATE_MAKERS)
@pytest.mark.parametrize("default", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_goes_back_in_torchs_own_types(name: str, default: torch.dtype) -> None:
    """5 twin steps, `copy_state_to`, 5 torch steps = 10 torch steps (to the twin's round-off),
    and the state torch continues from has the types of its own (float64 parameters beside a
    float32 default dtype: torch keeps its step counts in the default dtype)."""
    make = STATE_MAKERS[name]

    def loss(w: torch.Tensor, k: int) -> torch.Tensor:
        return ((w - k) ** 2).sum() + w.sin().sum()

    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        w0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ref = w0.clone().requires_grad_()
        ref_opt = make([ref])
        w = w0.clone().requires_grad_()
        opt = make([w])
        diffopt = higher.optim.get_diff_optim(opt, [w])
        params: list[torch.Tensor] = [w]
        for k in range(10):
            ref_opt.zero_grad()
            loss(ref, k).backward()
            ref_opt.step()
            if k < 5:
                params = diffopt.step(loss(params[0], k), params=params)
            else:
                if k == 5:
                    diffopt.copy_state_to(opt, copy_params=True)
                    copied = _types(opt.state[w])
                opt.zero_grad()
                loss(w, k).backward()
                opt.step()
        assert copied == _types(ref_opt.state[ref])
        torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-13)
    finally:
        torch.set_default_dtype(previous)


def test_a_rule_checks_its_own_options_when_made_and_at_every_override() -> None:
    """`Rule.check` sees each param group's options (an `extra` option the generic checks do
    not cover) when a twin is made and for every override, before any step; a refused
    override changes nothing."""
    seen: list[tuple[str, int]] = []

    def check(hyper: Any, params: Any) -> None:
        seen.append((type(hyper.get("scale")).__name__, len(params)))
        if not isinstance(hyper.get("scale"), torch.Tensor) or hyper["scale"].shape != (3,):
            raise higher.optim.HyperparameterTypeError(
                f"'scale' must be a tensor of shape (3,), got {hyper.get('scale')!r}"
            )

    base = higher.optim.DifferentiableSGD.rule
    rule = base._replace(name="ScaledSGD", extra=("scale",), check=check)

    class ScaledSGD(torch.optim.SGD):
        pass

    class DifferentiableScaledSGD(higher.optim.RuleOptimizer):
        pass

    DifferentiableScaledSGD.rule = rule
    higher.optim.register_optim(ScaledSGD, DifferentiableScaledSGD)
    w = torch.nn.Parameter(torch.ones(2))
    opt = ScaledSGD([w], lr=0.1)
    opt.param_groups[0]["scale"] = torch.ones(3)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert seen and seen[0] == ("Tensor", 1)
    with pytest.raises(higher.optim.HyperparameterTypeError, match=r"param group 0: 'scale' must"):
        higher.optim.get_diff_optim(opt, [w], override={"scale": [torch.ones(5)]})
    with pytest.raises(higher.optim.HyperparameterTypeError, match=r"'scale' must be a tensor"):
        diffopt.step(w.sum(), params=[w], override={"scale": [1.0]})
    assert diffopt.param_groups[0]["scale"].shape == (3,)  # the refused override changed nothing
    (new,) = diffopt.step(w.sum(), params=[w])
    assert new.tolist() == pytest.approx([0.9, 0.9])
