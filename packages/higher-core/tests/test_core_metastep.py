"""`higher.compile_meta_step`: the whole meta-step (compiled, or as a loop) equals the
innerloop_ctx loop in float64 — meta-gradient and learning-rate hypergradient, one task or many —
and refuses what it cannot run, on every torch (older ones: the compiled form is refused)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

import higher
from higher._torch_warnings import quiet_c_shim_notice
from higher.optim.rule import Rule

COMPILES = TorchVersion(torch.__version__) >= "2.13"
BACKEND = "aot_eager"  # dynamo + AOTAutograd, what inductor compiles, in seconds
TASKS, STEPS = 3, 4


def mse(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS, 5, 2, generator=g, dtype=torch.float64)
    return x, torch.randn(TASKS, 5, 1, generator=g, dtype=torch.float64)


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


# every built-in twin (RAdam rectifies from its 6th step on: 7 steps see both branches)
BUILT_IN: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    **OPTIMIZERS,
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.05),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.05),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=0.5),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05, t0=2),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.05),
}
if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
    BUILT_IN["adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=0.05)
LONG = 7


def reference(
    name: str, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS
) -> list[torch.Tensor]:
    """d(sum of the tasks' meta-losses) / d(initial weights, lr), by innerloop_ctx."""
    model = mlp()
    lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    opt = BUILT_IN[name](model.parameters())
    total = torch.zeros((), dtype=torch.float64)
    for t in range(TASKS):
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, override={"lr": [lr]}
        ) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(mse(fmodel, x[t], y[t]))
            total = total + mse(fmodel, x[t], y[t])
    return list(torch.autograd.grad(total, [*model.parameters(), lr]))


def meta_gradient(
    meta: higher.MetaStep, name: str, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    model = mlp()
    lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    opt = BUILT_IN[name](model.parameters())
    if meta.tasks is None:
        losses = [meta(model, opt, x[t], y[t], override={"lr": [lr]}) for t in range(TASKS)]
        total = torch.stack(losses).sum()
    else:
        total = meta(model, opt, x, y, override={"lr": [lr]}).sum()
    return list(torch.autograd.grad(total, [*model.parameters(), lr]))


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def compiled_or_refused(steps: int, tasks: int | None) -> higher.MetaStep | None:
    """The compiled meta-step of `mse` (aot_eager), or None once torch < 2.13 refused it."""
    if not COMPILES:
        with pytest.raises(higher.FastPathError, match=r"needs torch >= 2\.13.*compile=False"):
            higher.compile_meta_step(mse, mse, steps=steps, tasks=tasks)
        return None
    return higher.compile_meta_step(mse, mse, steps=steps, tasks=tasks, backend=BACKEND)


@pytest.mark.parametrize("tasks", [None, TASKS])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_loop_form_equals_innerloop_ctx(name: str, tasks: int | None) -> None:
    x, y = data()
    meta = higher.compile_meta_step(mse, mse, steps=STEPS, tasks=tasks, compile=False)
    assert_close(meta_gradient(meta, name, x, y), reference(name, x, y))


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_built_in_twin_with_tasks_equals_per_task_loops(name: str) -> None:
    """Step counts stay numbers in the loop form, and the count and the rule's scalar state
    (NAdam's mu_product, ASGD's eta and mu) one value for all tasks: RAdam's branch, ASGD's
    averaging test and Adafactor's float(step) run as in diffopt.step, NAdam to round-off."""
    x, y = data()
    meta = higher.compile_meta_step(mse, mse, steps=LONG, tasks=TASKS, compile=False)
    got, want = meta_gradient(meta, name, x, y), reference(name, x, y, LONG)
    if name == "asgd":  # lr reaches the weights through eta, kept in torch's scalar dtype
        # (float32 here): one shared eta sums the tasks' lr gradients in float32, the loops
        # in float64 after rounding each (batched_innerloop_ctx alike)
        torch.testing.assert_close(got.pop(), want.pop(), rtol=1e-7, atol=0)
    assert_close(got, want)


@pytest.mark.parametrize("name", [n for n in ["radam", "nadam", "adafactor"] if n in BUILT_IN])
def test_the_compiled_form_runs_step_dependent_rules_exactly(name: str) -> None:
    """In the compiled loop the count is a tensor: RAdam chooses its branch with where, NAdam
    multiplies mu_product in its own dtype, as torch does with a Python count (3.8e-8 apart in
    float64 before, with a float32 mu_product), and Adafactor takes step ** x, not float(step)
    ** x (dynamo's errors before)."""
    x, y = data()
    meta = compiled_or_refused(LONG, TASKS)
    if meta is not None:
        assert_close(meta_gradient(meta, name, x, y), reference(name, x, y, LONG))


class CountState(NamedTuple):
    step: int


def decaying_sgd(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: Any, hyper: Any
) -> tuple[list[torch.Tensor], CountState]:
    """SGD at lr / step, reading the step count as a Python number."""
    step = state.step + 1
    lr = hyper["lr"] / float(step)
    return [p - lr * g for p, g in zip(params, grads)], CountState(step)


class Decaying(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})


class DifferentiableDecaying(higher.optim.RuleOptimizer):
    rule = Rule("Decaying", CountState, lambda ps, hyper: CountState(0), decaying_sgd, ("lr",))


@pytest.mark.parametrize("tasks", [None, TASKS])
def test_the_compiled_form_refuses_a_rule_that_reads_its_count(tasks: int | None) -> None:
    """A rule that computes float(step): refused before compiling, naming it and what runs it
    (torch's dynamo or vmap error before); the loop form runs it."""
    higher.register_optim(Decaying, DifferentiableDecaying)
    model = mlp()
    opt = Decaying(model.parameters())
    x, y = data()
    batch = (x, y) if tasks else (x[0], y[0])
    assert (
        higher.compile_meta_step(mse, mse, steps=2, tasks=tasks, compile=False)(model, opt, *batch)
        .isfinite()
        .all()
    )
    meta = compiled_or_refused(2, tasks)
    if meta is None:
        return
    with pytest.raises(
        higher.FastPathError, match=r"cannot run Decaying.*compile=False.*batched_innerloop_ctx"
    ):
        meta(model, opt, *batch)
    assert all(p.grad is None for p in model.parameters())


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    ).double()  # fmt: skip


def ce(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("compiled", [False, True])
def test_batchnorm_in_training_mode_is_exact_with_tasks(compiled: bool) -> None:
    """Batch statistics: the task gradients are grad of vmap (vmap of grad is wrong there)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(TASKS, 6, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (TASKS, 6), generator=g)
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(TASKS):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(ce(fmodel, x[t], y[t]))
            total = total + ce(fmodel, x[t], y[t])
    want = list(torch.autograd.grad(total, list(model.parameters())))
    if compiled and not COMPILES:
        with pytest.raises(higher.FastPathError, match=r"needs torch >= 2\.13"):
            higher.compile_meta_step(ce, ce, steps=STEPS, tasks=TASKS)
        return
    meta = higher.compile_meta_step(
        ce, ce, steps=STEPS, tasks=TASKS, compile=compiled, backend=BACKEND
    )
    twin = convnet()
    opt = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.5)
    got = torch.autograd.grad(meta(twin, opt, x, y).sum(), list(twin.parameters()))
    assert_close(list(got), want)
    assert all(torch.equal(a, b) for a, b in zip(twin.buffers(), convnet().buffers()))


@pytest.mark.parametrize(("name", "tasks"), [("adam", None)])  # tasks: the BatchNorm test
def test_the_compiled_form_equals_innerloop_ctx(name: str, tasks: int | None) -> None:
    x, y = data()
    meta = compiled_or_refused(STEPS, tasks)
    if meta is None:
        return
    assert_close(meta_gradient(meta, name, x, y), reference(name, x, y))
    # a second call with other weights runs the same graph and is exact too
    assert_close(meta_gradient(meta, name, x * 0.5, y), reference(name, x * 0.5, y))


@pytest.mark.parametrize("name", ["adam"])
def test_inductor_matches(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Inductor itself, once, with tasks: the first step runs apart, then the loop (a scan
    starting from a step traced in the same graph, or with tasks from the expanded initial
    state, came out wrong under inductor)."""
    x, y = data()
    if not COMPILES:
        with pytest.raises(higher.FastPathError, match=r"needs torch >= 2\.13"):
            higher.compile_meta_step(mse, mse, steps=STEPS, tasks=TASKS)
        return
    meta = higher.compile_meta_step(mse, mse, steps=STEPS, tasks=TASKS, backend="inductor")
    with caplog.at_level(logging.WARNING, logger="torch._inductor"):
        assert_close(meta_gradient(meta, name, x, y), reference(name, x, y))
    # on a CPU the wrapper is C++ by default, and its per-graph notice is not shown
    assert meta._per_device.devices() == ["cpu"]
    assert not [r for r in caplog.records if "c-shim" in r.getMessage()], caplog.text


def test_only_the_c_shim_notice_is_filtered() -> None:
    """The filter the compiled meta-step installs on inductor's logger drops exactly the C++
    wrapper's proxy-executor notice; every other record of that logger passes."""
    quiet_c_shim_notice()
    quiet_c_shim_notice()  # installed once
    logger = logging.getLogger("torch._inductor.ir")
    (drop,) = [f for f in logger.filters if type(f).__name__ == "_DropCShimNotice"]
    assert isinstance(drop, logging.Filter)

    def passes(message: str, *args: object) -> bool:
        record = logging.LogRecord("torch._inductor.ir", logging.WARNING, "ir.py", 1, message,
                                   args, None)  # fmt: skip
        return bool(drop.filter(record))

    notice = "%s is missing a c-shim implementation, using proxy executor as fallback"
    assert not passes(notice, "aten.slice_copy.Tensor")
    assert not passes(notice % "aten.index_put.default")
    assert passes("aten.slice_copy.Tensor is missing a c-shim implementation")
    assert passes("using proxy executor as fallback")
    assert passes("an unrelated warning about %s", "aten.mm")
    assert passes("prefix: " + notice % "aten.slice_copy.Tensor")


def test_refusals_are_clear() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with pytest.raises(higher.FastPathError, match="steps must be a positive int"):
        higher.compile_meta_step(mse, mse, steps=0)
    with pytest.raises(higher.UsageError, match="callable"):
        higher.compile_meta_step(3, mse, steps=2)  # type: ignore[arg-type]
    loop = higher.compile_meta_step(mse, mse, steps=2, tasks=TASKS, compile=False)
    with pytest.raises(higher.FastPathError, match=r"task dimension first: shape \(3, \.\.\.\)"):
        loop(model, opt, x[0], y[0])
    with pytest.raises(higher.UsageError, match=r"torch\.optim\.Optimizer"):
        loop(model, "sgd", x, y)  # type: ignore[arg-type]
    bad = higher.compile_meta_step(lambda m, x, y: m(x) - y, mse, steps=2, compile=False)
    with pytest.raises(higher.FastPathError, match="scalar"):
        bad(model, opt, x[0], y[0])

    class Handmade(higher.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            pass

    class Plain(torch.optim.Adam):
        pass

    higher.register_optim(Plain, Handmade)
    with pytest.raises(higher.FastPathError, match="rule-based"):
        loop(model, Plain(model.parameters()), x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not COMPILES, reason="the compiled form needs torch >= 2.13 (tested above)")
def test_on_cuda_the_compiled_form_equals_the_loop() -> None:
    x, y = (t.cuda() for t in data())
    got = []
    for compiled in (False, True):
        model = mlp().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        meta = higher.compile_meta_step(mse, mse, steps=STEPS, tasks=TASKS, compile=compiled)
        got.append(
            list(torch.autograd.grad(meta(model, opt, x, y).sum(), list(model.parameters())))
        )
    assert_close(got[1], got[0])
