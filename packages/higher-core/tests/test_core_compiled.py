"""`higher.compile_step`: the compiled step matches `diffopt.step` step for step, meta-gradient
and hypergradient included (float64), and refuses what it cannot run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

import higher

COMPILES = TorchVersion(torch.__version__) >= "2.3"
# aot_eager traces exactly what inductor compiles (dynamo + AOTAutograd), in seconds; the
# inductor backend itself is checked once below.
BACKEND = "aot_eager"
# whether inductor's wrapper is C++ by default on a CPU
CPP_WRAPPER = TorchVersion(torch.__version__) >= "2.13"


def make_step(loss_fn: Callable[..., torch.Tensor], **kwargs: Any) -> higher.CompiledStep:
    """A compiled step where this torch can compile one; else the refusal is checked and the
    same step runs uncompiled."""
    if COMPILES:
        return higher.compile_step(loss_fn, backend=kwargs.pop("backend", BACKEND), **kwargs)
    with pytest.raises(higher.UsageError, match=r"needs torch >= 2\.3"):
        higher.compile_step(loss_fn)
    kwargs.pop("backend", None)
    return higher.compile_step(loss_fn, compile=False, **kwargs)


def mse(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 2, generator=g, dtype=torch.float64),
    )


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.05),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.05),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.05),
}


def advance(
    step: higher.CompiledStep | None,
    fmodel: Any,
    diffopt: Any,
    n: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> list[float]:
    """`n` inner steps on `mse`: by the compiled step, or by `diffopt.step` for None; the
    losses."""
    losses = []
    for _ in range(n):
        if step is None:
            loss = mse(fmodel, x, y)
            diffopt.step(loss)
        else:
            loss = step(fmodel, diffopt, x, y)
        losses.append(loss.item())
    return losses


def unroll(
    model: nn.Module,
    make_opt: Callable[[Any], torch.optim.Optimizer],
    step: higher.CompiledStep | None,
    steps: int = 4,
    **ctx: Any,
) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """Unroll with the compiled step (or `diffopt.step` for None); return the final weights,
    the losses and the meta-gradient with respect to the model's parameters."""
    x, y = data()
    xq, yq = data(2)
    with higher.innerloop_ctx(model, make_opt(model.parameters()), **ctx) as (fmodel, diffopt):
        losses = advance(step, fmodel, diffopt, steps, x, y)
        final = [p.detach() for p in fmodel.parameters()]
        meta = mse(fmodel, xq, yq)
        grads = torch.autograd.grad(meta, list(fmodel.parameters(time=0)))
    return final, losses, list(grads)


Case = tuple[nn.Module, higher.CompiledStep, tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def case() -> Case:
    """The MLP, a compiled step on `mse` (or its uncompiled form on an older torch), data."""
    return mlp(), make_step(mse), data()


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_diffopt_step_and_its_meta_gradient(name: str) -> None:
    model = mlp()
    step = make_step(mse)
    ref_final, ref_losses, ref_grads = unroll(model, OPTIMIZERS[name], None)
    final, losses, grads = unroll(model, OPTIMIZERS[name], step)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    assert_close(final, ref_final)
    assert_close(grads, ref_grads)
    assert ref_losses[-1] < ref_losses[0]  # the unroll trains: the comparison is not vacuous


def test_inductor_backend_matches() -> None:
    """Inductor itself, with its default options here (on a CPU from torch 2.13: the C++
    wrapper)."""
    model = mlp()
    step = make_step(mse, backend="inductor")
    for name in ("sgd", "adam"):
        ref_final, ref_losses, ref_grads = unroll(model, OPTIMIZERS[name], None)
        final, losses, grads = unroll(model, OPTIMIZERS[name], step)
        assert losses == pytest.approx(ref_losses, rel=1e-10)
        for u, v in zip(final + grads, ref_final + ref_grads, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


def test_history_and_state_advance_as_with_diffopt_step(case: Case) -> None:
    model, step, (x, y) = case
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        advance(step, fmodel, diffopt, 3, x, y)
        assert len(list(fmodel.parameters(time=3))) == 4
        assert diffopt.state[0][0]["step"] == 3
        exported = torch.optim.Adam(model.parameters(), lr=0.05)
        diffopt.copy_state_to(exported)
        assert int(exported.state[next(model.parameters())]["step"]) == 3
        with pytest.raises(higher.HigherError):
            fmodel.parameters(time=4).__next__()


def test_learning_rate_hypergradient_matches_finite_differences(case: Case) -> None:
    model, step, (x, y) = case
    xq, yq = data(2)

    def meta_loss(lr: torch.Tensor, by: higher.CompiledStep | None) -> torch.Tensor:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            advance(by, fmodel, diffopt, 3, x, y)
            return mse(fmodel, xq, yq)

    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(meta_loss(lr, step), lr)
    (ref,) = torch.autograd.grad(meta_loss(lr, None), lr)
    h = 1e-6
    with torch.no_grad():  # the compiled step also runs without a graph
        fd = (meta_loss(lr + h, step) - meta_loss(lr - h, step)) / (2 * h)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert abs(grad.item()) > 1e-4


def test_per_parameter_learning_rates_meta_sgd(case: Case) -> None:
    model, step, (x, y) = case
    xq, yq = data(2)
    lrs = [torch.full_like(p, 0.1, requires_grad=True) for p in model.parameters()]

    def run(by: higher.CompiledStep | None) -> list[torch.Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, override={"lr": [lrs]}) as (fmodel, diffopt):
            advance(by, fmodel, diffopt, 3, x, y)
            return list(torch.autograd.grad(mse(fmodel, xq, yq), lrs))

    assert_close(run(step), run(None))


def test_batchnorm_in_eval_mode_runs_and_batch_statistics_are_refused() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).double()
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 2)).double()
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():  # running statistics that are not the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    step = make_step(mse)
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if COMPILES:  # uncompiled, it is diffopt.step: batch statistics are fine there
        refused = pytest.raises(higher.UsageError, match=r"BatchNorm1d \(1\).*eval mode")
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt), refused:
            step(fmodel, diffopt, x, y)
    model.eval()
    ref_final, ref_losses, ref_grads = unroll(model, OPTIMIZERS["adam"], None)
    final, losses, grads = unroll(model, OPTIMIZERS["adam"], step)
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    assert_close(final, ref_final)
    assert_close(grads, ref_grads)


@pytest.mark.skipif(not COMPILES, reason="refusals of the compiled path; older torch is refused")
def test_norms_without_running_statistics_are_refused_in_eval_mode_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    model.eval()  # still batch statistics: eval mode does not help, and the message says so
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refused = pytest.raises(higher.UsageError, match=r"track_running_stats=False.*every mode")
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt), refused:
        make_step(lambda m, x, y: m(x).pow(2).mean())(fmodel, diffopt, *data())


def test_frozen_and_unused_parameters_are_not_stepped() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    model["used"].bias.requires_grad_(False)
    step = make_step(mse)
    x, y = data()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner["used"](x)
            return out

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with higher.innerloop_ctx(net, opt) as (fmodel, diffopt):
        before = [p.detach().clone() for p in fmodel.parameters()]
        step(fmodel, diffopt, x, y)
        after = [p.detach() for p in fmodel.parameters()]
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert changed == [True, False, False, False]  # used.weight; frozen bias; unused pair


def test_grad_callback_and_first_order_mode(case: Case) -> None:
    model, step, (x, y) = case

    def clip(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if g is None else g.clamp(-0.01, 0.01) for g in grads]

    finals = []
    for by in (step, None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = higher.innerloop_ctx(model, opt, track_higher_grads=False)
        with ctx as (fmodel, diffopt):
            diffopt._grad_callback = clip
            advance(by, fmodel, diffopt, 2, x, y)
            finals.append([p.detach() for p in fmodel.parameters()])
            assert all(p.grad_fn is None for p in fmodel.parameters())
    assert_close(finals[0], finals[1])


def test_refusals_are_clear(case: Case) -> None:
    model, step, (x, y) = case
    if not COMPILES:  # the refusal of this torch is checked by make_step; compile=False below
        return
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(higher.UsageError, match="functional model"):
            step(model, diffopt, x, y)  # type: ignore[arg-type]

        class Custom(higher.optim.DifferentiableOptimizer):
            def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
                pass

        custom = Custom(opt, model.parameters())
        with pytest.raises(higher.UsageError, match="rule-based"):
            step(fmodel, custom, x, y)
        other = higher.patch.monkeypatch(model)
        with pytest.raises(higher.UsageError, match="another functional model"):
            step(other, diffopt, x, y)
        bad = make_step(lambda m, x, y: (m(x) - y) ** 2)
        with pytest.raises(higher.UsageError, match="scalar"):
            bad(fmodel, diffopt, x, y)
        constant = make_step(lambda m, x, y: y.sum())
        with pytest.raises(higher.UsageError, match="does not depend"):
            constant(fmodel, diffopt, x, y)
    stateless = higher.patch.make_functional(model)
    alone = higher.get_diff_optim(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters())
    with pytest.raises(higher.HigherError, match="no fast weights"):
        step(stateless, alone, x, y)
    with pytest.raises(higher.UsageError, match="callable"):
        higher.compile_step(3)  # type: ignore[arg-type]


def test_uncompiled_step_is_diffopt_step() -> None:
    """compile=False runs `diffopt.step` itself: every optimizer, every model, its errors."""
    model = mlp()
    step = higher.compile_step(mse, compile=False)
    x, y = data()

    class Halving(higher.optim.DifferentiableOptimizer):  # a hand-written 0.2.1-style twin
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            for group, grads in zip(self.param_groups, grouped_grads):
                for j, g in enumerate(grads):
                    if g is not None:
                        group["params"][j] = group["params"][j] - 0.5 * g

    finals = []
    for by in (step, None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt) as (fmodel, _):
            diffopt = Halving(opt, model.parameters(), fmodel=fmodel)
            advance(by, fmodel, diffopt, 2, x, y)
            finals.append([p.detach() for p in fmodel.parameters()])
    assert_close(finals[0], finals[1])
    bad = higher.compile_step(lambda m, x, y: (m(x) - y) ** 2, compile=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (f, d), pytest.raises(higher.optim.OptimError):
        bad(f, d, x, y)  # not a scalar: diffopt.step's own error


class TwoHeads(nn.Module):
    """The loss uses the body and one head, chosen by a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 2)])

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        out: torch.Tensor = self.heads[head](torch.tanh(self.body(x)))
        return out


class OtherHead(TwoHeads):
    """The same parameter names as TwoHeads, another forward: head 1 unless told otherwise."""

    def forward(self, x: torch.Tensor, head: int = 1) -> torch.Tensor:
        return super().forward(x, head=1 - head if head == 0 else head)


def mse_head(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             head: int = 0) -> torch.Tensor:  # fmt: skip
    return F.mse_loss(model(x, head=head), y)


def head_unroll(
    model: nn.Module, step: higher.CompiledStep | None, head: int, steps: int = 2
) -> list[torch.Tensor]:
    """The final weights after `steps` steps of SGD with momentum and weight decay (which move
    every parameter that is stepped, so a wrongly stepped one shows)."""
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(steps):
            if step is None:
                diffopt.step(mse_head(fmodel, x, y, head=head))
            else:
                step(fmodel, diffopt, x, y, head=head)
        return [p.detach() for p in fmodel.parameters()]


@pytest.mark.parametrize("heads", [(0, 1), (1, 0, 1)])
def test_parameters_used_follow_the_keyword_arguments(heads: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = TwoHeads().double()
    step = make_step(mse_head)
    for head in heads:
        expected = head_unroll(model, None, head)
        assert_close(head_unroll(model, step, head), expected)
        unchanged = [torch.equal(a, b.detach()) for a, b in zip(expected, model.parameters())]
        heads_unchanged = [False, False, True, True] if head == 0 else [True, True, False, False]
        assert unchanged == [False, False, *heads_unchanged]


def test_parameters_the_loss_does_not_use_get_no_state() -> None:
    """A parameter the loss skips is not stepped, from the first step on: as with
    `diffopt.step`, no momentum buffer is made for it (the plan the model was checked with
    steps every parameter that requires grad, so the first step plans again)."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    x, y = data()
    states = []
    for step in (make_step(mse_head), None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(2):
                if step is None:
                    diffopt.step(mse_head(fmodel, x, y))
                else:
                    step(fmodel, diffopt, x, y)
            states.append(diffopt.state_dict()["state"])
    assert sorted(states[0]) == sorted(states[1]) == [0, 1, 2, 3]  # the body and head 0
    for k, slot in states[1].items():
        assert_close([states[0][k]["momentum_buffer"]], [slot["momentum_buffer"]])


def test_two_models_with_the_same_names_and_other_forwards() -> None:
    torch.manual_seed(0)
    first, second = TwoHeads().double(), OtherHead().double()
    second.load_state_dict(first.state_dict())
    step = make_step(mse_head)
    for model in (first, second, first):
        assert_close(head_unroll(model, step, 0), head_unroll(model, None, 0))


# Read by the forward below: a change torch.compile sees (it guards the global) but that no
# argument of the step shows, so only the step's check of its gradients can catch it.
USE_SECOND_HEAD = False


class GlobalSwitch(TwoHeads):
    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return super().forward(x, head=1 if USE_SECOND_HEAD else 0)


def test_a_change_no_argument_shows_is_caught_by_the_gradients() -> None:
    global USE_SECOND_HEAD
    torch.manual_seed(0)
    model = GlobalSwitch().double()
    step = make_step(mse_head)
    try:
        for switch in (False, True, False, True):
            USE_SECOND_HEAD = switch
            assert_close(head_unroll(model, step, 0), head_unroll(model, None, 0))
    finally:
        USE_SECOND_HEAD = False


def test_dead_units_with_zero_gradients_are_still_stepped() -> None:
    """A used parameter whose gradient is exactly zero (a dead ReLU layer) is stepped, as by
    `diffopt.step`: weight decay and momentum move it."""
    torch.manual_seed(0)
    first = nn.Linear(3, 4)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        first.bias.fill_(-100.0)  # every unit of the first layer is dead
    step = make_step(mse)
    for by in (step, step):  # the second call sees the zero gradient again
        finals = [head_unroll_plain(model, by), head_unroll_plain(model, None)]
        assert_close(finals[0], finals[1])


def head_unroll_plain(model: nn.Module, step: higher.CompiledStep | None) -> list[torch.Tensor]:
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        advance(step, fmodel, diffopt, 2, x, y)
        return [p.detach() for p in fmodel.parameters()]


def test_control_flow_on_tensor_values_is_refused_when_compiling() -> None:
    torch.manual_seed(0)
    model = TwoHeads().double()

    def branchy(m: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(m(x, head=0 if x.sum() > 0 else 1), y)

    x, y = data()
    uncompiled = higher.compile_step(branchy, compile=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    finals = []
    for sign in (1.0, -1.0):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            uncompiled(fmodel, diffopt, sign * x.abs(), y)
            finals.append([p.detach() for p in fmodel.parameters()])
    moved = [
        [not torch.equal(a, b.detach()) for a, b in zip(f, model.parameters())] for f in finals
    ]
    assert moved == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 2 + [True] * 2]
    if COMPILES:
        step = higher.compile_step(branchy, backend=BACKEND)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            with pytest.raises(higher.UsageError, match="compile=False"):
                step(fmodel, diffopt, x, y)
            assert len(list(fmodel.parameters(time=-1))) == 6  # nothing was stepped


def test_finished_inner_loops_are_freed_by_reference_counting() -> None:
    import gc
    import weakref

    model = mlp()
    step = make_step(mse)
    x, y = data()
    with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters())) as (f, d):
        advance(step, f, d, 2, x, y)  # compiles: torch.compile's tracing leaves cycles behind
    del f, d
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(5):
            with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters())) as (f, d):
                advance(step, f, d, 2, x, y)
            refs.append((weakref.ref(f), weakref.ref(d)))
            del f, d
        assert all(a() is None and b() is None for a, b in refs)
        assert len(step._contexts) == 0
    finally:
        gc.enable()


def counted_step() -> tuple[higher.CompiledStep, list[int]]:
    """A compiled step on `mse` whose backend runs each graph as traced, and the list it fills
    with one entry (the graph's node count) per graph compiled."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    return higher.compile_step(mse, backend=counting), graphs


@pytest.mark.skipif(not COMPILES, reason="counts torch.compile graphs; older torch is refused")
def test_one_step_object_compiles_once_for_every_task() -> None:
    model = mlp()
    step, graphs = counted_step()
    x, y = data()
    for task in range(4):
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(3):
                step(fmodel, diffopt, x + task, y)
        if task == 0:
            after_first = len(graphs)
    # Adam's first step (fresh state) and its later steps: a graph or two, all made in task 0
    assert 1 <= after_first <= 3
    assert len(graphs) == after_first


@pytest.mark.skipif(not COMPILES, reason="counts torch.compile graphs; older torch is refused")
def test_steps_from_the_models_own_parameters_run_the_later_steps_graph() -> None:
    """With copy_initial_weights=False the first step's weights are the model's Parameters:
    they run the graph of every later step (one graph for plain SGD), and the meta-gradient
    reaches them as through diffopt.step."""
    model = mlp()
    step, graphs = counted_step()
    x, y = data()
    xq, yq = data(2)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    for task in range(3):
        got: list[torch.Tensor] = []
        want: list[torch.Tensor] = []
        for runner in (step, None):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                advance(runner, fmodel, diffopt, 3, x + task, y)
                meta = mse(fmodel, xq, yq)
                (got if runner is step else want).extend(torch.autograd.grad(meta, params))
        assert_close(got, want)
    assert len(graphs) == 1


@pytest.mark.skipif(not COMPILES, reason="older torch is refused before torch.compile")
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"options": {"size_asserts": False, "cpp_wrapper": CPP_WRAPPER}}),
        (
            {"backend": "inductor"},
            {"backend": "inductor", "options": {"size_asserts": False, "cpp_wrapper": CPP_WRAPPER}},
        ),
        ({"mode": "max-autotune-no-cudagraphs"}, {"mode": "max-autotune-no-cudagraphs"}),
        ({"options": {"size_asserts": True}}, {"options": {"size_asserts": True}}),
        ({"backend": "aot_eager"}, {"backend": "aot_eager"}),
    ],
)
def test_inductor_gets_the_default_options_only_where_none_are_given(
    monkeypatch: pytest.MonkeyPatch, given: dict[str, Any], expected: dict[str, Any]
) -> None:
    """On a CPU, inductor's wrapper is C++ (from torch 2.13) and checks no sizes, unless the
    caller chose a mode or options; other backends get nothing added. The step runs (here
    uncompiled, torch.compile replaced) with what torch.compile was given."""
    if not expected.get("options", {}).get("cpp_wrapper", True):
        del expected["options"]["cpp_wrapper"]
    seen: list[dict[str, Any]] = []

    def recording(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    model = mlp()
    step = higher.compile_step(mse, **given)
    x, y = data()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (f, d):
        step(f, d, x, y)
        step(f, d, x, y)
    assert seen == [{"fullgraph": True, **expected}]  # one compiled function, made once
    assert len(list(f.parameters(time=2))) == 4


@pytest.mark.skipif(not COMPILES, reason="inspects torch.compile graphs; older torch is refused")
def test_steps_of_different_models_keep_static_shapes() -> None:
    """torch.compile remembers input shapes per code location: one step's shapes must not make
    another step (another model) compile for dynamic shapes."""
    symbolic: list[bool] = []

    def inspecting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        symbolic.append(any(isinstance(v, torch.SymInt) for v in values))
        return gm.forward

    for width in (5, 7):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
        step = higher.compile_step(mse, backend=inspecting)
        x, y = data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(2):
                step(fmodel, diffopt, x, y)
    assert symbolic and not any(symbolic)


def test_an_error_inside_the_step_leaves_the_model_usable(case: Case) -> None:
    model, step, (x, y) = case
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        step(fmodel, diffopt, x, y)
        before = [p.detach().clone() for p in fmodel.parameters()]
        with pytest.raises(Exception, match=r"shape|size"):
            step(fmodel, diffopt, torch.ones(6, 4, dtype=torch.float64), y)  # 4 features, not 3
        out = fmodel(x)  # the slots hold the weights again
        assert out.shape == (6, 2)
        after = [p.detach() for p in fmodel.parameters()]
        assert_close(after, before)
        assert len(list(fmodel.parameters(time=1))) == 4  # the failed step added no weights
        with pytest.raises(higher.HigherError):
            next(fmodel.parameters(time=2))


def _between_steps() -> dict[str, Callable[[Any, Any], None]]:
    """What a user may do between two compiled steps; the next step must see it (the last
    step's plan is reused only while nothing changed)."""

    def lr(diffopt: Any, fmodel: Any) -> None:
        diffopt.param_groups[0]["lr"] = 0.05

    def momentum(diffopt: Any, fmodel: Any) -> None:
        diffopt.param_groups[0]["momentum"] = 0.5

    def state(diffopt: Any, fmodel: Any) -> None:
        buf = diffopt.state[0][1]["momentum_buffer"]
        diffopt.state[0][1]["momentum_buffer"] = torch.ones_like(buf)

    def weights(diffopt: Any, fmodel: Any) -> None:
        fmodel.update_params([p * 0.5 for p in fmodel.fast_params])

    def loaded(diffopt: Any, fmodel: Any) -> None:
        saved = diffopt.state_dict()
        saved["state"][0]["momentum_buffer"] = -saved["state"][0]["momentum_buffer"]
        diffopt.load_state_dict(saved)

    def eager_step(diffopt: Any, fmodel: Any) -> None:
        x, y = data(3)
        diffopt.step(mse(fmodel, x, y))

    return {f.__name__: f for f in (lr, momentum, state, weights, loaded, eager_step)}


@pytest.mark.parametrize("change", sorted(_between_steps()))
def test_a_step_that_repeats_the_last_ones_plan_sees_every_change(change: str) -> None:
    """Compiled steps reuse the last step's plan while its signature holds; with one of the
    user's changes between steps 2 and 3 they still equal `diffopt.step`'s steps."""
    x, y = data()
    results = []
    for step in (make_step(mse), None):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            advance(step, fmodel, diffopt, 2, x, y)
            _between_steps()[change](diffopt, fmodel)
            advance(step, fmodel, diffopt, 2, x, y)
            meta = mse(fmodel, *data(2))
            results.append(
                [*fmodel.fast_params, *torch.autograd.grad(meta, list(model.parameters()))]
            )
    assert_close(results[0], results[1])


@pytest.mark.skipif(not COMPILES, reason="counts the compiled step's plans; older torch is refused")
def test_steps_of_one_signature_are_planned_once(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, step, (x, y) = case
    planned: list[int] = []
    plan = higher.optim.internal.plan

    def counted(*args: Any, **kwargs: Any) -> Any:
        planned.append(1)
        return plan(*args, **kwargs)

    monkeypatch.setattr(higher.optim.internal, "plan", counted)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        advance(step, fmodel, diffopt, 5, x, y)
        # planned once, when the model and optimizer are first checked: the first step runs
        # that plan, the later ones repeat it with their state
        assert len(planned) == 1
        diffopt.param_groups[0]["lr"] = 0.2
        advance(step, fmodel, diffopt, 2, x, y)
        assert len(planned) == 2  # the new lr is a new signature: planned once more


def test_the_tracing_filter_drops_exactly_torchs_tracing_warnings() -> None:
    """The one filter a compiled step installs for its call drops torch.compile's warning of
    reading a non-leaf weight's `.grad` and torch's warnings of its own deprecated parts, in
    any category; every other warning passes, the same text not at the start included."""
    from higher._torch_warnings import ignore_tracing_warnings

    non_leaf = (
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its "
        ".grad attribute won't be populated during autograd.backward()."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_tracing_warnings()
        warnings.warn(non_leaf, UserWarning, stacklevel=1)
        warnings.warn("`torch.jit.script` is deprecated. Use torch.compile", DeprecationWarning,
                      stacklevel=1)  # fmt: skip
        warnings.warn("`torch.jit.trace` is deprecated", FutureWarning, stacklevel=1)
        passing = [
            "an unrelated warning",
            f"prefix: {non_leaf}",
            "`torch.jit.script` is slow",
            "`numpy.foo` is deprecated",
        ]
        for message in passing:
            warnings.warn(message, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == passing
