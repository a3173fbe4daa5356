"""The step protocol: `plan` changes nothing, `StepPlan.update` is pure, `commit` stores; and a
step that is refused, at any point, leaves the optimizer exactly as it was."""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import higher.optim
from higher.optim import internal

T = torch.Tensor


def params() -> list[T]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True),
    ]


def loss_of(ps: list[T]) -> T:
    return (ps[0].sin().sum(0) * ps[1]).pow(2).sum()


def snapshot(diffopt: higher.optim.DifferentiableOptimizer) -> Any:
    """Everything a step may change: the options and slots of each group, and the state."""
    groups = [
        ({k: v for k, v in g.items() if k != "params"}, [p.tolist() for p in g["params"]])
        for g in diffopt.param_groups
    ]
    state = [
        {
            j: {k: (v.clone() if isinstance(v, T) else v) for k, v in s.items()}
            for j, s in gs.items()
        }
        for gs in diffopt.state
    ]
    return groups, state


def assert_same(a: Any, b: Any) -> None:
    (ga, sa), (gb, sb) = a, b
    assert ga == gb
    assert [sorted(s) for s in sa] == [sorted(s) for s in sb]
    for x, y in zip(sa, sb, strict=True):
        for j in x:
            assert x[j].keys() == y[j].keys()
            for k in x[j]:
                if isinstance(x[j][k], T):
                    assert torch.equal(x[j][k], y[j][k]), k
                else:
                    assert x[j][k] == y[j][k], k


MAKERS: dict[str, Callable[[list[T]], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True),
}


class HandWritten(higher.optim.DifferentiableOptimizer):
    """The 0.2.1 recipe: momentum SGD with its state kept in `self.state`."""

    def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
        for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for j, grad in enumerate(grads):
                if grad is None:
                    continue
                state = self.state[g][j]
                buf = grad if "buf" not in state else state["buf"] * 0.9 + grad
                state["buf"] = buf
                group["params"][j] = group["params"][j] - group["lr"] * buf


def twins() -> list[tuple[str, Callable[[list[T]], higher.optim.DifferentiableOptimizer]]]:
    def twin(make: Callable[[list[T]], torch.optim.Optimizer]) -> Callable[[list[T]], Any]:
        return lambda ps: higher.optim.get_diff_optim(make(ps), ps)

    out = [(name, twin(make)) for name, make in MAKERS.items()]
    out.append(("hand-written", lambda ps: HandWritten(torch.optim.SGD(ps, lr=0.1), ps)))
    return out


@pytest.mark.parametrize(("name", "make"), twins(), ids=[n for n, _ in twins()])
def test_plan_update_commit_is_step(
    name: str, make: Callable[[list[T]], higher.optim.DifferentiableOptimizer]
) -> None:
    ps = params()
    by_step, by_protocol = make(ps), make(ps)
    current_a, current_b = list(ps), list(ps)
    for _ in range(3):
        current_a = by_step.step(loss_of(current_a), params=current_a)
        grads = list(torch.autograd.grad(loss_of(current_b), current_b, create_graph=True))
        before = snapshot(by_protocol)
        plan = internal.plan(by_protocol, current_b)
        assert_same(snapshot(by_protocol), before)  # planning changes nothing
        first = plan.update(current_b, grads)
        again = plan.update(current_b, grads)  # pure: the same again, inputs untouched
        for u, v in zip(first.params, again.params, strict=True):
            assert torch.equal(u, v)
        assert_same(snapshot(by_protocol), before)
        current_b = internal.commit(by_protocol, plan, first)
    for a, b in zip(current_a, current_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same(snapshot(by_step), snapshot(by_protocol))
    meta = [torch.autograd.grad(loss_of(c), ps) for c in (current_a, current_b)]
    for a, b in zip(*meta, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_update_takes_other_states_and_hyperparameters() -> None:
    """What a memory mode or forward-mode pass needs: the same plan, run on other inputs."""
    ps = params()
    diffopt = higher.optim.get_diff_optim(torch.optim.Adam(ps, lr=0.05), ps)
    grads = list(torch.autograd.grad(loss_of(ps), ps))
    plan = internal.plan(diffopt, ps)
    result = plan.update(ps, grads)
    twice = plan.update(ps, grads, states=result.states)  # a second step from the first's state
    assert twice.states[0].step == 2
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    hyper = plan._replace(buckets=[b._replace(hyper={**b.hyper, "lr": lr}) for b in plan.buckets])
    new = hyper.update(ps, grads).params
    for a, b in zip(new, result.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    (d_lr,) = torch.autograd.grad(torch.stack([p.sum() for p in new]).sum(), lr)
    assert d_lr.item() != 0


def test_stepped_decides_which_parameters_move() -> None:
    ps = params()
    diffopt = higher.optim.get_diff_optim(torch.optim.SGD(ps, lr=0.1, weight_decay=0.5), ps)
    plan = internal.plan(diffopt, ps, stepped=[False, True])
    assert [b.indices for b in plan.buckets] == [(1,)]
    new = internal.commit(
        diffopt, plan, plan.update(ps, [None, torch.zeros(2, dtype=torch.float64)])
    )
    assert new[0] is ps[0]
    torch.testing.assert_close(new[1], ps[1] * 0.95)
    with pytest.raises(higher.optim.OptimError, match="gradient 1 is NoneType"):
        plan.update(ps, [None, None])
    with pytest.raises(higher.optim.OptimError, match="stepped has 1 entries"):
        internal.plan(diffopt, ps, stepped=[True])


@pytest.mark.parametrize("make", [
    functools.partial(torch.optim.SGD, lr=0.1),  # no state: grouped by dtype alone
    functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),  # none, then a buffer each
    functools.partial(torch.optim.Adam, lr=0.1),  # a fresh state from the first step
])  # fmt: skip
def test_a_bucket_holds_one_dtype_and_steps_as_torch(
    make: Callable[[Any], torch.optim.Optimizer],
) -> None:
    # 20 tensors (the kernels' path, not the per-tensor one), float32 and float64 interleaved
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float64] * 10
    ref = [torch.nn.Parameter(torch.randn(3, generator=g, dtype=d)) for d in dtypes]
    diffopt = higher.optim.get_diff_optim(make(ref), ref)
    torch_opt = make([torch.nn.Parameter(p.detach().clone()) for p in ref])

    def loss(ps: list[T]) -> T:
        return sum(((p.double() - k) ** 2).sum() * (k + 1) for k, p in enumerate(ps))  # type: ignore[return-value]

    ps: list[T] = list(ref)
    for step in range(3):
        plan = internal.plan(diffopt, ps)
        kinds = [{ps[i].dtype for i in b.indices} for b in plan.buckets]
        assert all(len(k) == 1 for k in kinds), f"step {step}: a bucket mixes dtypes {kinds}"
        assert sorted(i for b in plan.buckets for i in b.indices) == list(range(20))
        ps = diffopt.step(loss(ps), params=ps)
        torch_opt.zero_grad()
        loss(torch_opt.param_groups[0]["params"]).backward()
        torch_opt.step()
        for new, want in zip(ps, torch_opt.param_groups[0]["params"], strict=True):
            assert new.dtype == want.dtype
            torch.testing.assert_close(new, want, rtol=1e-6, atol=1e-7)


# -- a step that is refused changes nothing ---------------------------------------------------


def stepped_adam(track: bool = True) -> tuple[higher.optim.DifferentiableOptimizer, list[T]]:
    ps = params()
    diffopt = higher.optim.get_diff_optim(
        torch.optim.Adam(ps, lr=0.05), ps, track_higher_grads=track
    )
    current = diffopt.step(loss_of(ps), params=ps)
    return diffopt, current


REFUSALS: dict[str, tuple[Callable[[higher.optim.DifferentiableOptimizer, list[T]], Any], str]] = {
    "override with an unknown key": (
        lambda d, c: d.step(loss_of(c), params=c, override={"lr": [5.0], "nonexistent": [1.0]}),
        "nonexistent",
    ),
    "override of the wrong type": (
        lambda d, c: d.step(loss_of(c), params=c, override={"lr": ["fast"]}),
        "'lr' must be a number",
    ),
    "override lr tensor of a wrong shape": (
        lambda d, c: d.step(loss_of(c), params=c, override={"lr": [torch.ones(3)]}),
        r"'lr' is a tensor of shape \(3,\)",
    ),
    "per-parameter lr of a wrong shape": (
        lambda d, c: d.step(
            loss_of(c), params=c, override={"lr": [[torch.ones(3, 2), torch.ones(5)]]}
        ),
        r"'lr'\[1\] has shape \(5,\)",
    ),
    "params of the wrong dtype": (
        lambda d, c: d.step(loss_of([p.float() for p in c]), params=[p.float() for p in c]),
        "dtype torch.float32; expected torch.float64",
    ),
    "params of the wrong count": (
        lambda d, c: d.step(loss_of(c), params=c[:1]),
        "got 1 parameters; expected 2",
    ),
    "grad_callback returning None": (
        lambda d, c: d.step(loss_of(c), params=c, grad_callback=lambda g: None),  # type: ignore[arg-type,return-value]
        "must return a list of gradients",
    ),
    "grad_callback returning scalars": (
        lambda d, c: d.step(
            loss_of(c), params=c, grad_callback=lambda gs: [torch.tensor(1.0) for _ in gs]
        ),
        r"gradient 0 has shape \(\); expected \(3, 2\)",
    ),
    "grad_callback dropping a gradient": (
        lambda d, c: d.step(loss_of(c), params=c, grad_callback=lambda gs: gs[:1]),
        "returned 1 gradients; expected 2",
    ),
    "a loss of the original parameters": (
        lambda d, c: d.step(loss_of(d.param_groups[0]["params"][:0] + params()), params=c),
        "depends on none of the parameters given to step",
    ),
    "unexpected keyword": (
        lambda d, c: d.step(loss_of(c), params=c, momentum=1),
        "unexpected keyword",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_step_changes_nothing(case: str) -> None:
    call, message = REFUSALS[case]
    diffopt, current = stepped_adam()
    before = snapshot(diffopt)
    with pytest.raises(higher.errors.HigherError, match=message):
        call(diffopt, current)
    assert_same(snapshot(diffopt), before)
    # and the next step is the one an untouched optimizer takes
    reference, ref_current = stepped_adam()
    for a, b in zip(
        diffopt.step(loss_of(current), params=current),
        reference.step(loss_of(ref_current), params=ref_current),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_stale_loss_is_named() -> None:
    ps = params()
    fmodel = Weights([p.detach().clone().requires_grad_() for p in ps])
    diffopt = higher.optim.get_diff_optim(torch.optim.SGD(ps, lr=0.1), ps, fmodel=fmodel)
    stale = loss_of(fmodel.fast_params)
    diffopt.step(stale)
    with pytest.raises(higher.optim.OptimError, match="fast weights of an earlier step"):
        diffopt.step(stale)


class Weights:
    """A minimal functional model: fast weights with a history, as `higher.patch` keeps them."""

    def __init__(self, ps: list[T]) -> None:
        self.history = [list(ps)]

    @property
    def fast_params(self) -> list[T]:
        return self.history[-1]

    def update_params(self, params: list[T]) -> None:
        self.history.append(list(params))

    def parameters(self, time: int | None = None) -> list[T]:
        return self.history[-1 if time is None else time]


def test_the_same_parameter_twice_is_refused() -> None:
    w = torch.zeros(2, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = torch.optim.SGD([w, w], lr=0.1)  # torch steps it twice, and warns
    with pytest.raises(higher.optim.OptimError, match="same tensor as parameter 0 of group 0"):
        higher.optim.get_diff_optim(opt, [w])


# -- sparse gradients: as torch takes them -----------------------------------------------------


def sparse_run(make: Callable[[Any], torch.optim.Optimizer], torch_too: bool = True) -> tuple[T, T]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 3, sparse=True).double()
    opt = make(emb.parameters())
    diffopt = higher.optim.get_diff_optim(opt, [emb.weight])
    ids = [torch.tensor([1, 2, 1]), torch.tensor([4, 2])]
    current = [emb.weight.detach().clone().requires_grad_()]
    for step in range(4):
        idx = ids[step % 2]
        if torch_too:
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            with warnings.catch_warnings():  # torch's own sparse Adagrad warns of its checks
                warnings.filterwarnings("ignore", message="Sparse invariant checks")
                opt.step()
        current = diffopt.step(
            torch.nn.functional.embedding(idx, current[0], sparse=True).pow(2).sum(),
            params=current,
        )
    return current[0].detach(), emb.weight.detach()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01),
    ],
    ids=["sgd", "sgd-nesterov", "adagrad"],
)
def test_sparse_gradients_step_as_torch_does(make: Callable[[Any], torch.optim.Optimizer]) -> None:
    ours, theirs = sparse_run(make)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ps: torch.optim.Adam(ps), "Adam does not support sparse gradients"),
        (lambda ps: torch.optim.RMSprop(ps), "RMSprop does not support sparse gradients"),
        (lambda ps: torch.optim.Adagrad(ps, weight_decay=0.1), "weight_decay option is not"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1), "weight_decay option is not"),
    ],
    ids=["adam", "rmsprop", "adagrad-decay", "sgd-decay"],
)
def test_sparse_gradients_torch_refuses_are_refused(
    make: Callable[[Any], torch.optim.Optimizer], message: str
) -> None:
    with pytest.raises(higher.optim.OptimError, match=message):
        sparse_run(make, torch_too=False)


def test_deepcopy_is_independent() -> None:
    diffopt, current = stepped_adam()
    twin = copy.deepcopy(diffopt)
    a = diffopt.step(loss_of(current), params=current)
    b = twin.step(loss_of(current), params=current)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_pickle_round_trip_continues_the_same() -> None:

    diffopt, current = stepped_adam()  # its state carries a graph
    again = pickle.loads(pickle.dumps(diffopt))
    assert all(t.grad_fn is None for s in again.state for slot in s.values() for t in slot.values()
               if isinstance(t, T))  # fmt: skip
    params = [p.detach().requires_grad_() for p in current]
    for a, b in zip(
        diffopt.step(loss_of(params), params=params),
        again.step(loss_of(params), params=params),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_round_trips_through_a_torch_optimizer() -> None:
    ps = params()
    leaves = [p.detach().clone().requires_grad_() for p in ps]
    diffopt = higher.optim.get_diff_optim(torch.optim.Adam(ps, lr=0.05), ps)
    current = diffopt.step(loss_of(ps), params=ps)
    opt = torch.optim.Adam(leaves, lr=0.05)
    opt.load_state_dict(diffopt.state_dict())  # torch takes it as its own
    assert int(opt.state[leaves[0]]["step"]) == 1
    back = higher.optim.get_diff_optim(torch.optim.Adam(ps, lr=1.0), ps)
    back.load_state_dict(opt.state_dict())
    assert back.param_groups[0]["lr"] == 0.05
    for a, b in zip(
        back.step(loss_of(current), params=current),
        diffopt.step(loss_of(current), params=current),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(higher.optim.OptimError, match="sizes"):
        back.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})


def test_a_step_under_no_grad_is_first_order_and_keeps_the_weights_trainable() -> None:
    """With a closure (which runs with grad enabled) a step under `torch.no_grad()` computes
    what it computes with grad, keeps no graph, and the weights stay trainable for the next."""
    results = []
    for no_grad in (False, True):
        ps = params()
        diffopt = higher.optim.get_diff_optim(torch.optim.SGD(ps, lr=0.1, momentum=0.5), ps)
        current = ps
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for _ in range(3):
                current = diffopt.step(closure=functools.partial(loss_of, current), params=current)
        assert all(p.requires_grad for p in current)
        assert all((p.grad_fn is None) == no_grad for p in current)
        results.append([p.detach() for p in current])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


# -- a plan is bound to the optimizer and the state that made it -------------------------------


def adam_twin() -> tuple[higher.optim.DifferentiableOptimizer, list[T]]:
    ps = params()
    return higher.optim.get_diff_optim(torch.optim.Adam(ps, lr=0.01), ps), ps


def test_a_stale_plan_is_refused_and_changes_nothing() -> None:
    """Committing a plan made before another step would store a step from the old state (Adam's
    step count 1 instead of 2, weights an lr off)."""
    diffopt, ps = adam_twin()
    grads = list(torch.autograd.grad(loss_of(ps), ps))
    stale = internal.plan(diffopt, ps)
    result = stale.update(ps, grads)
    current = diffopt.step(loss_of(ps), params=ps)
    before = snapshot(diffopt)
    with pytest.raises(higher.optim.OptimError, match="stale plan") as caught:
        internal.commit(diffopt, stale, result)
    assert "make a new plan" in str(caught.value)
    assert_same(snapshot(diffopt), before)
    assert diffopt.state[0][0]["step"] == 1
    assert all(a is b for a, b in zip(diffopt.param_groups[0]["params"], current, strict=True))


def test_the_same_result_committed_twice_is_refused() -> None:
    """A second commit of one result would add a second history entry (and a second step)."""
    ps = params()
    fmodel = Weights([p.detach().clone().requires_grad_() for p in ps])
    diffopt = higher.optim.get_diff_optim(torch.optim.Adam(ps, lr=0.01), ps, fmodel=fmodel)
    fast = fmodel.fast_params
    plan = internal.plan(diffopt)
    result = plan.update(fast, list(torch.autograd.grad(loss_of(fast), fast)))
    internal.commit(diffopt, plan, result)
    before = snapshot(diffopt)
    with pytest.raises(higher.optim.OptimError, match="stale plan"):
        internal.commit(diffopt, plan, result)
    assert len(fmodel.history) == 2  # no second history entry
    assert_same(snapshot(diffopt), before)


def test_a_plan_of_another_optimizer_is_refused() -> None:
    """An Adam plan committed into an SGD twin would give its state `exp_avg`; a plan of
    another instance of the same class would store that one's step."""
    ps = params()
    sgd = higher.optim.get_diff_optim(torch.optim.SGD(ps, lr=0.1, momentum=0.9), ps)
    adam, _ = adam_twin()
    twin, _ = adam_twin()
    grads = list(torch.autograd.grad(loss_of(ps), ps))
    adam_plan = internal.plan(adam, ps)
    for target in (sgd, twin):
        before = snapshot(target)
        with pytest.raises(higher.optim.OptimError, match="made by another optimizer") as caught:
            internal.commit(target, adam_plan, adam_plan.update(ps, grads))
        assert "(a Adam step)" in str(caught.value)
        assert_same(snapshot(target), before)
    assert all("exp_avg" not in s for s in sgd.state[0].values())
    # the plan still commits into the optimizer that made it
    internal.commit(adam, adam_plan, adam_plan.update(ps, grads))
    assert adam.state[0][0]["step"] == 1


def test_a_copy_takes_no_plan_of_the_original() -> None:
    diffopt, ps = adam_twin()
    plan = internal.plan(diffopt, ps)
    result = plan.update(ps, list(torch.autograd.grad(loss_of(ps), ps)))
    for copied in (
        copy.deepcopy(diffopt),
        __import__("pickle").loads(__import__("pickle").dumps(diffopt)),
    ):
        with pytest.raises(higher.optim.OptimError, match="made by another optimizer"):
            internal.commit(copied, plan, result)
    internal.commit(diffopt, plan, result)


def test_load_state_dict_makes_earlier_plans_stale() -> None:
    diffopt, ps = adam_twin()
    plan = internal.plan(diffopt, ps)
    result = plan.update(ps, list(torch.autograd.grad(loss_of(ps), ps)))
    diffopt.load_state_dict(diffopt.state_dict())
    with pytest.raises(higher.optim.OptimError, match="stale plan"):
        internal.commit(diffopt, plan, result)


def test_the_step_driver_takes_the_step_and_the_class_stays_the_twin() -> None:
    diffopt, ps = adam_twin()
    calls: list[Any] = []

    def driver(
        d: Any, loss: Any, params: Any, override: Any, callback: Any, closure: Any, kwargs: Any
    ) -> list[T]:
        calls.append((d, loss, params))
        return ["driven"]  # type: ignore[list-item]

    internal.set_step_driver(diffopt, driver)
    assert type(diffopt) is higher.optim.DifferentiableAdam
    assert internal.step_driver(diffopt) is driver
    assert diffopt.step(loss_of(ps), params=ps) == ["driven"]
    assert calls[0][0] is diffopt and calls[0][2] is ps
    internal.set_step_driver(diffopt, None)
    assert internal.step_driver(diffopt) is None
    assert diffopt.state[0] == {}
    diffopt.step(loss_of(ps), params=ps)
    assert diffopt.state[0][0]["step"] == 1


def test_a_twin_that_overrides_step_takes_no_driver() -> None:
    class OwnStep(higher.optim.DifferentiableSGD):
        def step(self, *args: Any, **kwargs: Any) -> list[T]:
            return super().step(*args, **kwargs)

    ps = params()
    diffopt = OwnStep(torch.optim.SGD(ps, lr=0.1), ps)
    with pytest.raises(higher.optim.OptimError, match="OwnStep overrides step"):
        internal.set_step_driver(diffopt, lambda *a: [])
    assert internal.step_driver(diffopt) is None


def test_a_built_in_twin_with_a_hand_written_update_keeps_its_dict_state() -> None:
    """The 0.2.1 recipe on a subclass of a built-in twin: its `_update` runs and its per-slot
    dicts are stored (the rule's typed store used to take them and fail at commit)."""

    class Counting(higher.optim.DifferentiableSGD):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            for g, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for j, grad in enumerate(grads):
                    if grad is not None:
                        state = self.state[g][j]
                        state["n"] = state.get("n", 0) + 1
                        group["params"][j] = group["params"][j] - group["lr"] * grad

    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    diffopt = Counting(torch.optim.SGD([w], lr=0.5), [w])
    current = [w]
    for _ in range(2):
        current = diffopt.step(current[0].sum(), params=current)
    assert current[0].tolist() == [0.0, 0.0]
    assert dict(diffopt.state[0]) == {0: {"n": 2}}


class _Weights:
    """A functional model: `step(loss)` takes its fast weights and updates them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.fast_params = list(params)

    def update_params(self, params: list[torch.Tensor]) -> None:
        self.fast_params = list(params)


def _changes() -> dict[str, Callable[[Any, _Weights], None]]:
    """What a user may do between two steps of an inner loop, each of which the next step
    must see (it may not reuse the last step's plan as it was)."""

    def lr_item(diffopt: Any, fmodel: _Weights) -> None:
        diffopt.param_groups[0]["lr"][1] = torch.tensor(0.3, dtype=torch.float64)

    def lr_value(diffopt: Any, fmodel: _Weights) -> None:
        diffopt.param_groups[0]["momentum"] = 0.5

    def state(diffopt: Any, fmodel: _Weights) -> None:
        diffopt.state[0][1]["momentum_buffer"] = torch.ones(3, dtype=torch.float64)

    def weights(diffopt: Any, fmodel: _Weights) -> None:
        fmodel.update_params([p * 0.5 for p in fmodel.fast_params])

    def loaded(diffopt: Any, fmodel: _Weights) -> None:
        saved = diffopt.state_dict()
        saved["state"].setdefault(0, {})["momentum_buffer"] = torch.full(
            (2,), -1.0, dtype=torch.float64
        )
        diffopt.load_state_dict(saved)

    def unused(diffopt: Any, fmodel: _Weights) -> None:
        pass  # the step after it has no gradient for one parameter (see the loss)

    def group_replaced(diffopt: Any, fmodel: _Weights) -> None:
        # a new dict, `params` first as torch orders it, with one option changed
        group = diffopt.param_groups[0]
        new = {"params": group["params"], **{k: v for k, v in group.items() if k != "params"}}
        new["dampening"] = 0.25
        diffopt.param_groups[0] = new

    def params_written(diffopt: Any, fmodel: _Weights) -> None:
        # a step writes `params` and never reads it: nothing changes
        diffopt.param_groups[0]["params"] = [p.detach() for p in diffopt.param_groups[0]["params"]]

    def state_cleared(diffopt: Any, fmodel: _Weights) -> None:
        diffopt.state[0].clear()  # the next step starts the momentum afresh, as torch's would

    changes = (
        lr_item, lr_value, state, weights, loaded, unused, group_replaced, params_written,
        state_cleared,
    )  # fmt: skip
    return {f.__name__: f for f in changes}


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("change", sorted(_changes()))
def test_a_step_that_repeats_the_last_one_sees_every_change(change: str, momentum: float) -> None:
    """Steps of `step(loss)` through a functional model (the last step's checks and plan
    reused while they hold) and of `step(loss, params=...)` (each planned anew) agree, with one
    of the user's changes made between steps 3 and 4 (with momentum, and without: a rule that
    keeps no state until a change gives it some)."""

    def run(through_fmodel: bool) -> list[torch.Tensor]:
        w = [
            torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64, requires_grad=True),
        ]
        lrs = [torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
        opt = torch.optim.SGD(w, lr=0.1, momentum=momentum)
        fmodel = _Weights(w)
        diffopt = higher.optim.get_diff_optim(
            opt, w, fmodel=fmodel if through_fmodel else None, override={"lr": [lrs]}
        )
        current = list(w)
        for k in range(6):
            if k == 4:
                if not through_fmodel:
                    fmodel.fast_params = current
                _changes()[change](diffopt, fmodel)
                current = fmodel.fast_params
            uses_both = not (change == "unused" and k == 4)
            loss = (current[0] ** 2).sum() * (k + 1) + ((current[1] ** 3).sum() if uses_both else 0)
            if through_fmodel:
                diffopt.step(loss)
                current = fmodel.fast_params
            else:
                current = diffopt.step(loss, params=current)
        return current

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["momentum", "lr item"])
def test_a_group_laid_out_by_hand_is_checked_at_every_step(value: str) -> None:
    """A param group replaced by a dict in torch's order (`params` first) at step 2, and one of
    its options changed at step 4 (a value, or an item of its per-parameter `lr`): the steps
    through a functional model see the change as the steps planned anew do."""

    def run(through_fmodel: bool) -> list[torch.Tensor]:
        w = [
            torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64, requires_grad=True),
        ]
        lrs = [torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
        fmodel = _Weights(w)
        diffopt = higher.optim.get_diff_optim(
            torch.optim.SGD(w, lr=0.1, momentum=0.9), w,
            fmodel=fmodel if through_fmodel else None, override={"lr": [lrs]},
        )  # fmt: skip
        current = list(w)
        for k in range(7):
            group = diffopt.param_groups[0]
            if k == 2:
                diffopt.param_groups[0] = {"params": group["params"]} | {
                    key: v for key, v in group.items() if key != "params"
                }
            elif k == 4 and value == "momentum":
                group["momentum"] = 0.5
            elif k == 4:
                group["lr"][0] = torch.tensor(0.05, dtype=torch.float64)
            loss = (current[0] ** 2).sum() * (k + 1) + (current[1] ** 3).sum()
            if through_fmodel:
                diffopt.step(loss)
                current = fmodel.fast_params
            else:
                current = diffopt.step(loss, params=current)
        assert next(iter(diffopt.param_groups[0])) == "params"  # still laid out by hand
        return current

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
