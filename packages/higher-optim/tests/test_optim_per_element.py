"""Per-element hyperparameters: a tensor of many values in a param group, broadcasting to every
parameter of the group (as 0.2.1 ran them), exact against hand-written references and
differentiable to finite differences; refused, naming the hyperparameter, where it would
change a parameter's shape or the optimizer needs one value."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import higher.optim
from higher.contrib import check_hypergradient
from higher.optim.rule import Rule

T = torch.Tensor
STEPS = 7  # RAdam rectifies from step 6 on
ERR = higher.optim.HyperparameterTypeError

# name -> options (every numeric one away from its default, so that each one matters)
OPTIONS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.1, "momentum": 0.5, "dampening": 0.2, "weight_decay": 0.1},
    "Adam": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
    "AdamW": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
    "Adagrad": {
        "lr": 0.1,
        "lr_decay": 0.1,
        "weight_decay": 0.1,
        "eps": 1e-3,
        "initial_accumulator_value": 0.2,
    },
    "Adadelta": {"lr": 1.0, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.1},
    "Adamax": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
    "ASGD": {"lr": 0.05, "lambd": 0.1, "alpha": 0.5, "t0": 1.5, "weight_decay": 0.1},
    "RMSprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5},
    "Rprop": {"lr": 0.05, "etas": (0.4, 1.3), "step_sizes": (1e-3, 0.07)},
    "NAdam": {
        "lr": 0.05,
        "betas": (0.8, 0.9),
        "eps": 1e-3,
        "weight_decay": 0.1,
        "momentum_decay": 0.05,
    },
    "RAdam": {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1},
    "Adafactor": {"lr": 0.05, "beta2_decay": -0.5, "d": 1.5, "weight_decay": 0.1},
}
NAMES = [n for n in OPTIONS if hasattr(torch.optim, n)]


def rule_of(name: str) -> Rule:
    twin: Any = getattr(higher.optim, f"Differentiable{name}")
    return twin.rule  # type: ignore[no-any-return]


pytestmark = pytest.mark.usefixtures("float64_default")


def initial_params() -> list[T]:
    """Two parameters of one group, (4, 3) and (3,): a tensor of shape (3,) broadcasts to both."""
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(),
        torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(),
    ]


def inner_loss(params: list[T], k: int) -> T:
    a, b = params
    x = torch.tensor([0.7, -0.4, 0.3], dtype=a.dtype) + 0.2 * k
    return ((a @ x).tanh() ** 2).sum() + ((b - 0.3 * k) ** 2).sum() + (a.sum() * b[0]).sin()


def meta_loss(params: list[T]) -> T:
    a, b = params
    return ((a - 0.3) ** 2).sum() + b.sin().sum()


def per_element(value: float, spread: float = 0.0, seed: int = 0) -> T:
    """A (3,) tensor at or below `value`: broadcasts to both parameters of `initial_params`."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(3, generator=gen, dtype=torch.float64)
    return value * (1 - spread * noise)


def cases() -> list[Any]:
    found = []
    for name in NAMES:
        for key in rule_of(name).per_element:
            if key in OPTIONS[name]:
                found.append(pytest.param(name, key, id=f"{name}-{key}"))
    return found


def as_elements(options: dict[str, Any], key: str, make: Any) -> Any:
    """`options[key]` with each number replaced by `make(number)` (both items of a pair)."""
    value = options[key]
    return tuple(make(v) for v in value) if isinstance(value, tuple) else make(value)


@pytest.mark.parametrize(("name", "key"), cases())
def test_constant_per_element_values_follow_torch(name: str, key: str) -> None:
    """A per-element tensor filled with one number steps as that number does in torch.optim."""
    options = OPTIONS[name]
    params = initial_params()
    opt = getattr(torch.optim, name)(params, **options)
    twin_opt = getattr(torch.optim, name)(params, **options)
    twin_opt.param_groups[0][key] = as_elements(options, key, per_element)
    diffopt = higher.optim.get_diff_optim(twin_opt, params)
    fast = [p.detach().clone().requires_grad_() for p in params]
    for k in range(STEPS):
        opt.zero_grad()
        torch.autograd.backward(inner_loss(params, k))
        opt.step()
        fast = diffopt.step(inner_loss(fast, k), params=fast)
        for ours, theirs in zip(fast, params, strict=True):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "key"), cases())
def test_per_element_hypergradients_equal_finite_differences(name: str, key: str) -> None:
    """Each entry of a per-element hyperparameter (of both items of a pair), by central
    differences in float64."""
    options = OPTIONS[name]
    value = options[key]
    items = list(value) if isinstance(value, tuple) else [value]
    base = {f"h{i}": per_element(v, 0.2, seed=i) for i, v in enumerate(items)}

    def unroll(**hs: T) -> T:
        params = initial_params()
        opt = getattr(torch.optim, name)(initial_params(), **options)
        given = tuple(hs.values()) if isinstance(value, tuple) else hs["h0"]
        diffopt = higher.optim.get_diff_optim(
            opt, opt.param_groups[0]["params"], override={key: [given]}
        )
        for k in range(STEPS):
            params = diffopt.step(inner_loss(params, k), params=params)
        return meta_loss(params)

    step = 1e-6 * min(1.0, *(abs(v) for v in items))  # eps is 1e-3: a step of its size
    report = check_hypergradient(unroll, base, eps=step, rtol=1e-5, atol=1e-8)
    assert len(report.entries) == 3 * len(items)
    if key in ("lr", "betas", "momentum", "eps", "weight_decay"):  # these move every entry
        assert min(abs(e.finite_difference) for e in report.entries) > 1e-9


# -- hand-written references ---------------------------------------------------------------


def sgd_reference(
    params: list[T], grads: list[T], bufs: list[T | None], lr: list[T], momentum: T, wd: T
) -> tuple[list[T], list[T]]:
    """0.2.1's SGD step, element by element: `p + (-lr) * g`, `buf * momentum + 1 * g`."""
    new_p, new_b = [], []
    for p, g, buf, r in zip(params, grads, bufs, lr, strict=True):
        g = g + wd * p
        buf = g if buf is None else buf * momentum + 1 * g
        new_p.append(p + (-r) * buf)
        new_b.append(buf)
    return new_p, new_b


def adam_reference(
    params: list[T], grads: list[T], state: list[tuple[T, T]], k: int, lr: T, b1: T, b2: T
) -> tuple[list[T], list[tuple[T, T]]]:
    """Adam as its paper writes it, each hyperparameter one value per element."""
    eps = 1e-3
    new_p, new_s = [], []
    for p, g, (m, v) in zip(params, grads, state, strict=True):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**k), v / (1 - b2**k)
        new_p.append(p - lr * m_hat / (v_hat.sqrt() + eps))
        new_s.append((m, v))
    return new_p, new_s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_per_element_equals_021_bit_for_bit(dtype: torch.dtype) -> None:
    """Per-element lr (one tensor per group, shaped like its parameter), 0-d momentum and
    per-element weight decay: the twin computes 0.2.1's SGD arithmetic exactly."""
    gen = torch.Generator().manual_seed(0)
    params = [p.detach().to(dtype).requires_grad_() for p in initial_params()]
    lr = [0.1 + 0.1 * torch.rand(p.shape, generator=gen, dtype=dtype) for p in params]
    momentum = torch.tensor(0.9, dtype=dtype, requires_grad=True)
    wd = 0.01 * torch.rand(3, generator=gen, dtype=dtype)  # broadcasts to both
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.5)
    for group, r in zip(opt.param_groups, lr, strict=True):
        group.update(lr=r, momentum=momentum, weight_decay=wd)
    diffopt = higher.optim.get_diff_optim(opt, params)
    fast, ref = list(params), list(params)
    bufs: list[T | None] = [None, None]
    for k in range(STEPS):
        fast = diffopt.step(inner_loss(fast, k), params=fast)
        grads = list(torch.autograd.grad(inner_loss(ref, k), ref, create_graph=True))
        ref, new_bufs = sgd_reference(ref, grads, bufs, lr, momentum, wd)
        bufs = list(new_bufs)
        for ours, theirs in zip(fast, ref, strict=True):
            assert torch.equal(ours, theirs)
    ours_grad = torch.autograd.grad(meta_loss(fast), [momentum, *params])
    ref_grad = torch.autograd.grad(meta_loss(ref), [momentum, *params])
    for a, b in zip(ours_grad, ref_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


def test_adam_per_element_equals_hand_written_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    params = initial_params()
    lr = 0.05 * (1 + torch.rand(3, generator=gen)).requires_grad_()
    b1 = (0.8 + 0.1 * torch.rand(3, generator=gen)).requires_grad_()
    b2 = (0.9 + 0.09 * torch.rand(3, generator=gen)).requires_grad_()
    opt = torch.optim.Adam(params, lr=0.1, eps=1e-3)
    diffopt = higher.optim.get_diff_optim(opt, params, override={"lr": [lr], "betas": [(b1, b2)]})
    fast, ref = list(params), list(params)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for k in range(STEPS):
        fast = diffopt.step(inner_loss(fast, k), params=fast)
        grads = list(torch.autograd.grad(inner_loss(ref, k), ref, create_graph=True))
        ref, state = adam_reference(ref, grads, state, k + 1, lr, b1, b2)
        for ours, theirs in zip(fast, ref, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    wrt = [lr, b1, b2, *params]
    ours_grad = torch.autograd.grad(meta_loss(fast), wrt)
    ref_grad = torch.autograd.grad(meta_loss(ref), wrt)
    for a, b in zip(ours_grad, ref_grad, strict=True):
        assert a.shape == b.shape and b.abs().min() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# -- the three routes in ---------------------------------------------------------------------


def routes() -> dict[str, Any]:
    """Per-step per-element learning rates given three ways; each returns the meta-loss."""

    def torch_group(rates: list[T]) -> T:
        params = initial_params()
        opt = torch.optim.SGD(initial_params(), lr=0.1, momentum=0.5)
        opt.param_groups[0]["lr"] = rates[0]
        diffopt = higher.optim.get_diff_optim(opt, opt.param_groups[0]["params"])
        for k in range(3):
            diffopt.param_groups[0]["lr"] = rates[k] if k else diffopt.param_groups[0]["lr"]
            params = diffopt.step(inner_loss(params, k), params=params)
        return meta_loss(params)

    def param_groups(rates: list[T]) -> T:
        params = initial_params()
        opt = torch.optim.SGD(initial_params(), lr=0.1, momentum=0.5)
        diffopt = higher.optim.get_diff_optim(opt, opt.param_groups[0]["params"])
        for k in range(3):
            diffopt.param_groups[0]["lr"] = rates[k]
            params = diffopt.step(inner_loss(params, k), params=params)
        return meta_loss(params)

    def override(rates: list[T]) -> T:
        params = initial_params()
        opt = torch.optim.SGD(initial_params(), lr=0.1, momentum=0.5)
        diffopt = higher.optim.get_diff_optim(
            opt, opt.param_groups[0]["params"], override={"lr": [rates[0]]}
        )
        for k in range(3):
            params = diffopt.step(inner_loss(params, k), params=params, override={"lr": [rates[k]]})
        return meta_loss(params)

    return {"torch group": torch_group, "param_groups": param_groups, "override": override}


def test_three_routes_give_the_same_numbers_and_hypergradients() -> None:
    gen = torch.Generator().manual_seed(2)
    rates = [(0.1 * (1 + torch.rand(3, generator=gen))).requires_grad_() for _ in range(3)]
    results = {}
    for route, run in routes().items():
        meta = run(rates)
        results[route] = (meta.detach(), torch.autograd.grad(meta, rates))
    # by hand: SGD with momentum 0.5, a (3,) learning rate per step
    params, bufs = initial_params(), list[T]()
    for k in range(3):
        grads = torch.autograd.grad(inner_loss(params, k), params, create_graph=True)
        bufs = [b * 0.5 + g for g, b in zip(grads, bufs, strict=True)] if k else list(grads)
        params = [p - rates[k] * b for p, b in zip(params, bufs, strict=True)]
    expected = meta_loss(params)
    expected_grads = torch.autograd.grad(expected, rates)
    for meta, grads in results.values():
        assert torch.equal(meta, expected.detach())
        for a, b in zip(grads, expected_grads, strict=True):
            assert a.shape == (3,) and b.abs().min() > 0
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_published_hyperparameter_optimization_pattern() -> None:
    """One param group per parameter; before every step a tensor learning rate shaped like the
    group's parameter (one per step) and a 0-d momentum tensor are put into
    `diffopt.param_groups[i]`; the validation loss is differentiated with respect to them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 50)
    x, y = torch.randn(32, 13), torch.randn(32, 50)
    x_val, y_val = torch.randn(16, 13), torch.randn(16, 50)
    opt = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1, momentum=0.9)
    rates = [
        [torch.full(p.shape, 0.05 + 0.01 * k, requires_grad=True) for p in model.parameters()]
        for k in range(4)
    ]
    momentum = torch.tensor(0.9, requires_grad=True)
    for group, rate in zip(opt.param_groups, rates[0], strict=True):
        group["lr"] = rate  # before the loop, on the torch optimizer itself
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for k in range(4):
            for group, rate in zip(diffopt.param_groups, rates[k], strict=True):
                group["lr"], group["momentum"] = rate, momentum
            diffopt.step(torch.nn.functional.mse_loss(fmodel(x), y))
        val = torch.nn.functional.mse_loss(fmodel(x_val), y_val)
    wrt = [momentum, *(r for step in rates for r in step)]
    grads = torch.autograd.grad(val, wrt)
    # the unrolled reference, written out
    w = model.weight.detach().clone().requires_grad_()
    b = model.bias.detach().clone().requires_grad_()
    bufs: list[T] = []
    for k in range(4):
        loss = torch.nn.functional.mse_loss(x @ w.T + b, y)
        gs = torch.autograd.grad(loss, [w, b], create_graph=True)
        bufs = [buf * momentum + g for g, buf in zip(gs, bufs)] if k else list(gs)
        w, b = w - rates[k][0] * bufs[0], b - rates[k][1] * bufs[1]
    expected = torch.nn.functional.mse_loss(x_val @ w.T + b, y_val)
    expected_grads = torch.autograd.grad(expected, wrt)
    torch.testing.assert_close(val, expected, rtol=1e-12, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.shape == want.shape and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# -- refusals ----------------------------------------------------------------------------------


def twin(opt: torch.optim.Optimizer, **kwargs: Any) -> higher.optim.DifferentiableOptimizer:
    return higher.optim.get_diff_optim(opt, opt.param_groups[0]["params"], **kwargs)


@pytest.mark.parametrize("shape", [(2, 50, 13), (3,), (13, 50)])
def test_a_tensor_that_would_change_a_shape_is_refused_on_every_route(shape: tuple[int]) -> None:
    w = torch.nn.Parameter(torch.ones(50, 13))
    bad = torch.full(shape, 0.1)
    message = re.escape(f"param group 0: hyperparameter 'lr' is a tensor of shape {shape}")
    opt = torch.optim.SGD([w], lr=0.1)
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ERR, match=message):
        twin(opt)
    with pytest.raises(ERR, match=message):
        twin(torch.optim.SGD([w], lr=0.1), override={"lr": [bad]})
    diffopt = twin(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ERR, match=message):
        diffopt.step((w**2).sum(), params=[w], override={"lr": [bad]})
    assert diffopt.param_groups[0]["lr"] == 0.1  # the rejected step changed nothing
    diffopt.param_groups[0]["lr"] = bad
    with pytest.raises(ERR, match=message):
        diffopt.step((w**2).sum(), params=[w])


def test_refusal_says_what_is_expected() -> None:
    w = torch.nn.Parameter(torch.ones(50, 13))
    with pytest.raises(ERR) as info:
        twin(torch.optim.SGD([w], lr=0.1), override={"momentum": [torch.ones(3)]})
    assert str(info.value) == (
        "param group 0: hyperparameter 'momentum' is a tensor of shape (3,), which does not "
        "broadcast to the shape (50, 13) of parameter 0 of the group without changing it; "
        "expected one value (a 0-d tensor), one value per element (a tensor that broadcasts to "
        "every parameter of the group, keeping its shape)"
    )


ONE_VALUE = [
    ("NAdam", "betas", (torch.full((3,), 0.9), 0.999)),
    ("NAdam", "momentum_decay", torch.full((3,), 4e-3)),
    ("RAdam", "betas", (0.9, torch.full((3,), 0.999))),
    ("ASGD", "lr", torch.full((3,), 0.01)),
    ("ASGD", "t0", torch.full((3,), 10.0)),
    ("Adafactor", "beta2_decay", torch.full((3,), -0.8)),
    ("Adafactor", "eps", (None, torch.full((3,), 1e-3))),
]


@pytest.mark.parametrize(
    ("name", "key", "value"), [c for c in ONE_VALUE if hasattr(torch.optim, c[0])]
)
def test_a_rule_that_needs_one_value_refuses_it_per_element(
    name: str, key: str, value: Any
) -> None:
    opt = getattr(torch.optim, name)(initial_params())
    with pytest.raises(ERR) as info:
        twin(opt, override={key: [value]})
    assert f"hyperparameter {key!r} is a tensor of shape (3,); expected one value" in str(
        info.value
    )
    assert f"{name} takes one value for {key!r}" in str(info.value)


def test_complex_parameter_refuses_per_element_values() -> None:
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.complex128))
    with pytest.raises(ERR, match="parameter 0 of the group is complex"):
        twin(torch.optim.SGD([w], lr=0.1), override={"lr": [torch.full((3,), 0.1)]})


def test_functional_api_takes_one_value() -> None:
    with pytest.raises(ERR, match="one value per element is taken in a param group"):
        higher.optim.functional.sgd(lr=torch.full((3,), 0.1))


# -- regressions found on the way ---------------------------------------------------------------


def test_one_value_of_more_dimensions_keeps_the_parameter_shapes() -> None:
    """A learning rate of shape (1, 1) over 20 parameters (enough to fuse them) steps each one
    keeping its shape; over a 0-d or 1-d parameter it is refused (it would give them 2)."""
    params = [torch.nn.Parameter(torch.ones(2, 3)) for _ in range(20)]
    lr = torch.tensor([[0.25]], requires_grad=True)
    diffopt = twin(torch.optim.SGD(params, lr=0.1), override={"lr": [lr]})
    new = diffopt.step(torch.stack([p.sum() for p in params]).sum(), params=params)
    assert all(p.shape == (2, 3) and p.tolist() == [[0.75] * 3] * 2 for p in new)
    assert torch.autograd.grad(torch.cat(new).sum(), lr)[0].item() == -120.0
    for shape in [(), (3,)]:
        w = torch.nn.Parameter(torch.ones(shape))
        with pytest.raises(ERR, match=re.escape("shape (1, 1), which does not broadcast to the")):
            twin(torch.optim.SGD([w], lr=0.1), override={"lr": [lr]})


def test_per_parameter_learning_rate_of_a_complex_parameter_serves_both_halves() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0 + 2.0j, -1.0 + 0.5j], dtype=torch.complex128))
    lr = torch.tensor([0.0, 0.5], dtype=torch.float64)
    diffopt = twin(torch.optim.SGD([w], lr=0.1), override={"lr": [[lr]]})
    (new,) = diffopt.step((w.abs() ** 2).sum(), params=[w])
    (grad,) = torch.autograd.grad((w.abs() ** 2).sum(), w)
    assert torch.equal(new, w - lr * grad)
