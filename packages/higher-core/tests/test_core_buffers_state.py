"""Running statistics are state of each step: an inner loop that interleaves eval-mode steps
(they read the running statistics) with training-mode steps (they update them) gets, in every
mode and path, the meta-gradient of a hand-written unroll that carries the statistics out of
place, one tensor per step (float64, rtol 1e-8); the original model's buffers never change, and
the functional model's statistics at the end are the reference's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

import higher
from higher.optim import internal

STEPS = 10
EVAL_STEPS = frozenset({3, 6, 9})
MOMENTUM = 0.3  # BatchNorm's
TASKS = 2
Tensors = list[torch.Tensor]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8, momentum=MOMENTUM), nn.Tanh(), nn.Linear(8, 1)
    ).double()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None
    assert bn.running_var is not None
    with torch.no_grad():  # statistics that are not the defaults
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def make_data(seed: int) -> tuple[Tensors, Tensors, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 3, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(STEPS)]
    ys = [torch.randn(16, 1, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    x_meta = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y_meta = torch.randn(16, 1, generator=g, dtype=torch.float64)
    return xs, ys, x_meta, y_meta


def learnable_lr() -> torch.Tensor:
    return torch.tensor(0.1, dtype=torch.float64, requires_grad=True)


# ---- the reference: statistics out of place by hand -------------------------------------------


def _forward(
    p: Tensors, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var = mean.clone(), var.clone()  # this step's statistics: a tensor of its own
    h = F.batch_norm(F.linear(x, p[0], p[1]), mean, var, p[2], p[3], training, MOMENTUM, 1e-5)
    return F.linear(torch.tanh(h), p[4], p[5]), mean, var


class Reference:
    """Meta-loss, meta-gradient and final statistics of the interleaved unroll, by hand."""

    def __init__(
        self,
        model: nn.Module,
        lr: torch.Tensor,
        data: tuple[Tensors, Tensors, torch.Tensor, torch.Tensor],
        window: int | None = None,
        copy_initial_weights: bool = False,
        eval_steps: frozenset[int] = EVAL_STEPS,
        meta_training: bool = True,
    ) -> None:
        xs, ys, x_meta, y_meta = data
        initial: Tensors = list(model.parameters())
        p = [q.detach().requires_grad_() for q in initial] if copy_initial_weights else initial
        buffers = {k.rsplit(".", 1)[-1]: b for k, b in model.named_buffers()}
        mean = buffers["running_mean"].detach().clone()
        var = buffers["running_var"].detach().clone()
        count = int(buffers["num_batches_tracked"])
        velocity: list[torch.Tensor | None] = [None] * len(p)
        for t in range(STEPS):
            if window is not None and t == STEPS - window:  # earlier steps are constants
                p = [q.detach().requires_grad_() for q in p]
                velocity = [v.detach() if v is not None else None for v in velocity]
            training = t not in eval_steps
            out, mean, var = _forward(p, mean, var, xs[t], training)
            count += training
            grads = torch.autograd.grad(F.mse_loss(out, ys[t]), p, create_graph=True)
            velocity = [g if v is None else 0.9 * v + g for v, g in zip(velocity, grads)]
            p = [q - lr * v for q, v in zip(p, velocity) if v is not None]
        out, mean, var = _forward(p, mean, var, x_meta, meta_training)
        self.meta_loss = F.mse_loss(out, y_meta)
        self.mean, self.var, self.count = mean, var, count + meta_training
        self.wrt = [*initial, lr]

    def gradients(self) -> list[torch.Tensor]:
        found = torch.autograd.grad(self.meta_loss, self.wrt, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(found, self.wrt)]


# ---- the paths under test -----------------------------------------------------------------------


class Outcome:
    """What a path gives: the meta-loss (differentiable), the final statistics."""

    def __init__(self, meta_loss: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        self.meta_loss = meta_loss
        self.mean = buffers["1.running_mean"].detach().clone()
        self.var = buffers["1.running_var"].detach().clone()
        self.count = buffers["1.num_batches_tracked"].clone()


def _mse(fmodel: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(fmodel(x), y)


def _bound(fmodel: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: _mse(fmodel, x, y)


def unrolled(unroll: Any, copy_initial_weights: bool = False, closure: bool = True) -> Runner:
    def run(model: nn.Module, lr: torch.Tensor, data: Any) -> Outcome:
        xs, ys, x_meta, y_meta = data
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=copy_initial_weights, override={"lr": [lr]},
            unroll=unroll,
        ) as (fmodel, diffopt):  # fmt: skip
            for t in range(STEPS):
                fmodel.train(t not in EVAL_STEPS)
                if closure:
                    diffopt.step(closure=_bound(fmodel, xs[t], ys[t]))
                else:
                    diffopt.step(_mse(fmodel, xs[t], ys[t]))
            fmodel.train()
            return Outcome(_mse(fmodel, x_meta, y_meta), dict(fmodel.named_buffers()))

    return run


def compiled_steps(compile: bool) -> Runner:
    """compile_step for the steps it runs: every step with compile=False; with compile=True the
    eval-mode steps (batch statistics in training mode are refused by compile_step)."""
    kwargs: dict[str, Any] = {"backend": "eager"} if compile else {}

    def run(model: nn.Module, lr: torch.Tensor, data: Any) -> Outcome:
        step = higher.compile_step(_mse, compile=compile, **kwargs)
        xs, ys, x_meta, y_meta = data
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, override={"lr": [lr]}
        ) as (fmodel, diffopt):
            for t in range(STEPS):
                training = t not in EVAL_STEPS
                fmodel.train(training)
                if training and compile:
                    diffopt.step(_mse(fmodel, xs[t], ys[t]))
                else:
                    step(fmodel, diffopt, xs[t], ys[t])
            fmodel.train()
            return Outcome(_mse(fmodel, x_meta, y_meta), dict(fmodel.named_buffers()))

    return run


Runner = Callable[[nn.Module, torch.Tensor, Any], Outcome]

# forward mode differentiates with respect to a few hyperparameters only (here the lr)
HYPER_ONLY: dict[str, Any] = {"copy_initial_weights": True}
PATHS: dict[str, tuple[Runner, dict[str, Any]]] = {
    "full": (unrolled("full", closure=False), {}),
    "full-closure": (unrolled("full"), {}),
    "recompute": (unrolled("recompute"), {}),
    "recompute-unchecked": (unrolled(higher.Recompute(check=False)), {}),
    "recompute-every-3": (unrolled(higher.Recompute(every=3)), {}),
    "truncated-4": (unrolled(higher.Truncated(window=4)), {"window": 4}),
    "forward": (unrolled("forward", copy_initial_weights=True, closure=False), HYPER_ONLY),
    "forward-closure": (unrolled("forward", copy_initial_weights=True), HYPER_ONLY),
    "compile-step-eager": (compiled_steps(False), {}),
    "compile-step-compiled": (compiled_steps(True), {}),
}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_interleaved_eval_and_training_steps_are_exact(path: str) -> None:
    if path == "compile-step-compiled" and TorchVersion(torch.__version__) < "2.3":
        pytest.skip("compile_step needs torch >= 2.3; older torch is refused")
    run, options = PATHS[path]
    data = make_data(1)
    model = make_model()
    before = {k: b.clone() for k, b in model.named_buffers()}
    reference = Reference(model, learnable_lr(), data, **options)
    want = reference.gradients()

    lr = learnable_lr()
    got = run(model, lr, data)
    wrt = [*model.parameters(), lr]
    if options.get("copy_initial_weights"):
        wrt = [lr]
        want = want[-1:]
    found = torch.autograd.grad(got.meta_loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(found, wrt)]
    _close(got.meta_loss.detach(), reference.meta_loss.detach())
    for g, w in zip(grads, want):
        _close(g, w)
    _close(got.mean, reference.mean)
    _close(got.var, reference.var)
    assert int(got.count) == reference.count
    for k, b in model.named_buffers():  # the original model's buffers are never written
        assert torch.equal(b, before[k]), k


def test_batched_tasks_each_get_their_own_reference() -> None:
    datas = [make_data(1 + t) for t in range(TASKS)]
    model = make_model()
    before = {k: b.clone() for k, b in model.named_buffers()}
    references = [Reference(model, learnable_lr(), data) for data in datas]
    want = [sum(parts) for parts in zip(*(r.gradients() for r in references))]

    xs = [torch.stack([d[0][t] for d in datas]) for t in range(STEPS)]
    ys = [torch.stack([d[1][t] for d in datas]) for t in range(STEPS)]
    x_meta, y_meta = torch.stack([d[2] for d in datas]), torch.stack([d[3] for d in datas])
    mse = torch.vmap(F.mse_loss)
    lr = learnable_lr()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with higher.batched_innerloop_ctx(
        model, opt, tasks=TASKS, copy_initial_weights=False, override={"lr": [lr]}
    ) as (fmodel, diffopt):
        for t in range(STEPS):
            fmodel.train(t not in EVAL_STEPS)
            diffopt.step(mse(fmodel(xs[t]), ys[t]))
        fmodel.train()
        meta = mse(fmodel(x_meta), y_meta)
        buffers = fmodel.named_buffers()
    got = torch.autograd.grad(meta.sum(), [*model.parameters(), lr])
    for g, w in zip(got, want):
        _close(g, w)
    for t, reference in enumerate(references):
        _close(meta[t].detach(), reference.meta_loss.detach())
        _close(buffers["1.running_mean"][t], reference.mean)
        _close(buffers["1.running_var"][t], reference.var)
        assert int(buffers["1.num_batches_tracked"][t]) == reference.count
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k


# ---- compile_meta_step: the statistics flow from step to step --------------------------------


class StatsNet(nn.Module):
    """The MLP, whose forward reads the running statistics when asked (`frozen=True`, as in
    eval mode): how a loss function of compile_meta_step, which gets no module to switch,
    evaluates at the statistics of its time."""

    def __init__(self) -> None:
        super().__init__()
        seq = make_model()
        self.lin1 = seq.get_submodule("0")
        bn = seq.get_submodule("1")
        assert isinstance(bn, nn.BatchNorm1d)
        self.bn = bn
        self.lin2 = seq.get_submodule("3")

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        h = self.lin1(x)
        if frozen:
            bn = self.bn
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                             bn.eps)  # fmt: skip
        else:
            h = self.bn(h)
        out: torch.Tensor = self.lin2(torch.tanh(h))
        return out


def _frozen_mse(fmodel: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(fmodel(x, frozen=True), y)


@pytest.mark.parametrize("tasks", [None, TASKS])
@pytest.mark.parametrize("compiled", [False, True])
def test_meta_step_outer_loss_reads_the_statistics_after_the_steps(
    compiled: bool, tasks: int | None
) -> None:
    """Inner steps in training mode move the statistics; the outer loss reads them."""
    if compiled and TorchVersion(torch.__version__) < "2.13":
        pytest.skip("the compiled meta-step needs torch >= 2.13; older torch is refused")
    n = 1 if tasks is None else tasks
    datas = []
    for t in range(n):
        xs, ys, _, _ = make_data(1 + t)  # one batch for every step and the outer loss
        datas.append(([xs[0]] * STEPS, [ys[0]] * STEPS, xs[0], ys[0]))
    model = StatsNet()
    before = {k: b.clone() for k, b in model.named_buffers()}
    references = [
        Reference(model, learnable_lr(), d, eval_steps=frozenset(), meta_training=False)
        for d in datas
    ]
    want = [sum(parts) for parts in zip(*(r.gradients() for r in references))]

    meta = higher.compile_meta_step(
        _mse, _frozen_mse, steps=STEPS, tasks=tasks, compile=compiled, backend="aot_eager"
    )
    lr = learnable_lr()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    if tasks is None:
        batch = (datas[0][0][0], datas[0][1][0])
    else:
        batch = (torch.stack([d[0][0] for d in datas]), torch.stack([d[1][0] for d in datas]))
    losses = meta(model, opt, *batch, override={"lr": [lr]})
    got = torch.autograd.grad(losses.sum(), [*model.parameters(), lr])
    for g, w in zip(got, want):
        _close(g, w)
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k


# ---- a buffer updated in place outside training mode --------------------------------------------


class Decay(nn.Module):
    """Scales its input by a buffer that it halves, in place, at every call (in any mode); the
    forward reads a copy, so no step's graph sees the later values."""

    def __init__(self) -> None:
        super().__init__()
        self.scale: torch.Tensor
        self.register_buffer("scale", torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.clone()
        self.scale.mul_(0.5)
        return x * scale


def _squared(fmodel: Any, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: fmodel(x).pow(2).mean()


@pytest.mark.parametrize("unroll", ["recompute", higher.Recompute(check=False)])
def test_recompute_restores_a_buffer_changed_in_place_as_its_step_found_it(unroll: Any) -> None:
    """Each rebuilt step runs with the buffer as it was when the step was first taken (a copy
    is kept: the live tensor, changed in place, always equals itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), Decay(), nn.Linear(2, 1)).double().eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(4)]

    def meta_gradient(mode: Any) -> tuple[torch.Tensor, ...]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll=mode) as (
            fmodel, diffopt,
        ):  # fmt: skip
            for x in xs:
                diffopt.step(closure=_squared(fmodel, x))
            meta = fmodel(xs[0]).pow(2).mean()
            return torch.autograd.grad(meta, list(model.parameters()))

    for got, want in zip(meta_gradient(unroll), meta_gradient("full")):
        _close(got, want)
    assert float(model.get_buffer("1.scale")) == 1.0


# ---- the engine's pure step ---------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["func", "autograd"])
def test_pure_step_takes_buffers_in_and_gives_new_ones_out(gradient: str) -> None:
    """One step of the engine: the buffers given are not written; the new ones, the weights
    and the state are those of `diffopt.step` on the functional model."""
    from higher._engine import Batch, Program, autograd_gradient, func_gradient, pure_step

    model = make_model()
    xs, ys, _, _ = make_data(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        names = tuple(fmodel.named_fast_params())
        params = fmodel.fast_params
        plan = internal.plan(diffopt, params)
        buffers = {k: b.clone() for k, b in fmodel.named_buffers()}
        given = {k: b.clone() for k, b in buffers.items()}
        out = pure_step(
            params, None, plan, buffers, Batch((xs[0], ys[0]), {}),
            program=Program(fmodel, names, _mse), wrt=range(len(params)),
            gradient=func_gradient if gradient == "func" else autograd_gradient,
        )  # fmt: skip
        diffopt.step(_mse(fmodel, xs[0], ys[0]))  # the same step in the loop form
        for k, b in buffers.items():
            assert torch.equal(b, given[k]), k  # the inputs are not written
        for k, b in fmodel.named_buffers():
            _close(out.buffers[k].double(), b.double())
        assert not torch.equal(out.buffers["1.running_mean"], given["1.running_mean"])
        for a, b in zip(out.params, fmodel.fast_params):
            _close(a, b)
        _close(out.opt_state[0].momentum_buffer[0], diffopt.state[0][0]["momentum_buffer"])
