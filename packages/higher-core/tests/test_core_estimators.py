"""higher.estimators: ES, PES, truncated ES and truncated backprop, proved against exact values.

The inner problem is least squares trained by full-batch gradient descent, in float64: its
weights move linearly, so the total loss is a quadratic function of the initial weights (ES's
Gaussian smoothing leaves the gradient of a quadratic unchanged) and a smooth one of the
learning rate; the exact hypergradient is autograd's through the whole unroll, itself checked
against the ordinary `innerloop_ctx` loop. Tolerances come from each estimate's standard error.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import higher
import higher.estimators as est

WORKER = Path(__file__).with_name("_estimator_worker.py")
D, N, T, K = 3, 16, 6, 2  # features, samples, inner steps, truncation length


def mse(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = (model(x) - y).pow(2).mean()
    return loss


def problem_data(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(1, D, generator=gen, dtype=torch.float64))
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(D, 1, generator=gen, dtype=torch.float64)
    # every step sees the same full batch: the step dimension first
    return net, x.expand(T, N, D), y.expand(T, N, 1)


Made = tuple[torch.nn.Module, torch.optim.Optimizer, est.InnerProblem, torch.Tensor, torch.Tensor]


def make_problem(opt_cls: type[torch.optim.Optimizer] = torch.optim.SGD, **options: Any) -> Made:
    net, xs, ys = problem_data()
    opt = opt_cls(net.parameters(), **{"lr": 0.1, **options})
    problem = est.InnerProblem(net, opt, mse, hyper=["lr"], weights=True)
    return net, opt, problem, xs, ys


def exact_total(problem: est.InnerProblem, meta: list[torch.Tensor], *data: Any) -> list[Any]:
    """d (sum of all T steps' losses) / d meta, by autograd through the whole unroll."""
    one = est.TruncatedBackprop(problem.unroll, problem.init)
    return one.step(meta, *data).grads


def truncations(xs: torch.Tensor, ys: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xs[s : s + K], ys[s : s + K]) for s in range(0, T, K)]


# ---- the inner problem is the ordinary loop --------------------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_inner_problem_steps_as_innerloop_ctx(opt_cls: type[torch.optim.Optimizer]) -> None:
    net, opt, problem, xs, ys = make_problem(opt_cls, lr=0.05)
    meta = problem.meta()
    state, total = problem.unroll(meta, problem.init(meta), xs, ys)
    with higher.innerloop_ctx(net, opt) as (fmodel, diffopt):
        losses = []
        for k in range(T):
            losses.append(mse(fmodel, xs[k], ys[k]))
            diffopt.step(losses[-1])
        ref = [p.detach() for p in fmodel.parameters()]
    torch.testing.assert_close(total, torch.stack(losses).sum().detach(), rtol=1e-12, atol=0)
    for got, want in zip(problem.params(state), ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_vmapped_particles_step_as_separate_loops(opt_cls: type[torch.optim.Optimizer]) -> None:
    """Three learning rates as one vmapped batch: each particle as its own innerloop_ctx."""
    net, opt, problem, xs, ys = (
        make_problem(opt_cls, lr=0.05, momentum=0.5)
        if (opt_cls is torch.optim.SGD)
        else make_problem(opt_cls, lr=0.05)
    )
    lrs = torch.tensor([0.01, 0.05, 0.2], dtype=torch.float64)
    weights = [w.expand(3, *w.shape) for w in problem.meta()[1:]]

    def one(lr: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
        meta = [lr, *w]
        return problem.unroll(meta, problem.init(meta), xs, ys)[1]

    got = torch.func.vmap(one)(lrs, *weights)
    for i, lr in enumerate(lrs.tolist()):
        with higher.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            total = torch.zeros((), dtype=torch.float64)
            for k in range(T):
                loss = mse(fmodel, xs[k], ys[k])
                total = total + loss.detach()
                diffopt.step(loss)
        torch.testing.assert_close(got[i], total, rtol=1e-12, atol=0)


def test_meta_loss_fn_is_taken_after_each_step() -> None:
    net, xs, ys = problem_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    after = est.InnerProblem(net, opt, mse, meta_loss_fn=lambda m, x, y: m(x).abs().sum())
    state, total = after.unroll([], after.init([]), xs[:2], ys[:2])
    with higher.innerloop_ctx(net, opt) as (fmodel, diffopt):
        expected = torch.zeros((), dtype=torch.float64)
        for k in range(2):
            diffopt.step(mse(fmodel, xs[k], ys[k]))
            expected = expected + fmodel(xs[k]).abs().sum().detach()
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(after.forward(state, xs[0]), fmodel(xs[0]).detach())


def test_the_model_and_optimizer_are_not_changed() -> None:
    net, opt, problem, xs, ys = make_problem(torch.optim.Adam, lr=0.05)
    before = [p.detach().clone() for p in net.parameters()]
    pes = est.PES(problem.unroll, problem.init, particles=4, sigma=0.01, seed=0)
    for x, y in truncations(xs, ys):
        pes.step(problem.meta(), x, y)
    est.TruncatedBackprop(problem.unroll, problem.init).step(problem.meta(), xs, ys)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in net.parameters())


def test_tbptt_matches_finite_differences_and_the_ordinary_loop() -> None:
    net, opt, problem, xs, ys = make_problem()
    meta = problem.meta()
    grads = exact_total(problem, meta, xs, ys)
    # the ordinary loop: d (sum of losses) / d (lr, initial weights)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with higher.innerloop_ctx(net, opt, override={"lr": [lr]}, copy_initial_weights=False) as (
        fmodel,
        diffopt,
    ):
        total = torch.zeros((), dtype=torch.float64)
        for k in range(T):
            loss = mse(fmodel, xs[k], ys[k])
            total = total + loss
            diffopt.step(loss)
        ref = torch.autograd.grad(total, [lr, next(net.parameters())])
    torch.testing.assert_close(grads[0], ref[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[1], ref[1], rtol=1e-10, atol=1e-14)
    h = 1e-6

    def loss_at(lr_value: float) -> float:
        m = [torch.tensor(lr_value, dtype=torch.float64), *meta[1:]]
        return float(problem.unroll(m, problem.init(m), xs, ys)[1])

    fd = (loss_at(0.1 + h) - loss_at(0.1 - h)) / (2 * h)
    assert abs(grads[0].item() - fd) < 1e-7 * max(1.0, abs(fd))


# ---- the estimators converge to the exact values ---------------------------------------------


def test_es_over_the_full_unroll_converges_to_the_exact_hypergradient() -> None:
    _, _, problem, xs, ys = make_problem()
    meta = problem.meta()
    exact = exact_total(problem, meta, xs, ys)

    def total(m: list[torch.Tensor]) -> torch.Tensor:
        return problem.unroll(m, problem.init(m), xs, ys)[1]

    e = est.es_gradient(total, meta, particles=4000, sigma=1e-3, seed=1)
    assert e.particles == 4000
    norm = torch.cat([g.reshape(-1) for g in exact]).norm()
    for g, se, want in zip(e.grads, e.stderr, exact):
        # an ES draw's spread in every entry is about the norm of the whole gradient
        assert (se < 0.05 * norm).all(), (se, norm)  # the estimate is informative
        assert ((g - want).abs() < 4 * se).all(), (g, want, se)


def test_pes_over_truncations_is_unbiased_and_truncated_es_is_not() -> None:
    """PES summed over the truncations estimates the full unroll's gradient (as ES does); TES
    estimates the truncated one, which truncated backprop gives exactly."""
    _, _, problem, xs, ys = make_problem()
    meta = problem.meta()
    exact = exact_total(problem, meta, xs, ys)
    pes = est.PES(problem.unroll, problem.init, particles=4000, sigma=1e-3, seed=2)
    tes = est.TruncatedES(problem.unroll, problem.init, particles=4000, sigma=1e-3, seed=3)
    tbptt = est.TruncatedBackprop(problem.unroll, problem.init)
    zero = [torch.zeros_like(m) for m in meta]
    sums: dict[str, list[torch.Tensor]] = {}
    errs: dict[str, list[torch.Tensor]] = {}
    for x, y in truncations(xs, ys):
        for name, estimator in (("pes", pes), ("tes", tes), ("tbptt", tbptt)):
            e = estimator.step(meta, x, y)
            sums[name] = [a + b for a, b in zip(sums.get(name, zero), e.grads)]
            errs[name] = [a + b for a, b in zip(errs.get(name, zero), e.stderr)]
    for i in range(2):
        # the triangle inequality bounds the standard error of a sum of correlated estimates
        assert ((sums["pes"][i] - exact[i]).abs() < 4 * errs["pes"][i]).all()
        assert ((sums["tes"][i] - sums["tbptt"][i]).abs() < 4 * errs["tes"][i]).all()
        assert torch.equal(errs["tbptt"][i], torch.zeros_like(exact[i]))
    # truncation's bias is far outside the noise: the learning rate's hypergradient
    bias = (sums["tbptt"][0] - exact[0]).abs()
    assert bias > 10 * errs["tes"][0] and bias > 0.1 * exact[0].abs()


def test_one_truncation_of_pes_is_es_with_the_same_noise() -> None:
    _, _, problem, xs, ys = make_problem()
    meta = problem.meta()
    pes = est.PES(problem.unroll, problem.init, particles=8, sigma=1e-2, seed=5)
    e1 = pes.step(meta, xs, ys)

    def total(m: list[torch.Tensor]) -> torch.Tensor:
        return problem.unroll(m, problem.init(m), xs, ys)[1]

    e2 = est.es_gradient(total, meta, particles=8, sigma=1e-2, seed=5)
    for a, b in zip(e1.grads + e1.stderr, e2.grads + e2.stderr):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(e1.loss, e2.loss)


@pytest.mark.parametrize("cls", [est.PES, est.TruncatedES])
@pytest.mark.parametrize("antithetic", [True, False])
def test_a_loop_of_particles_computes_what_vmap_computes(cls: Any, antithetic: bool) -> None:
    _, _, problem, xs, ys = make_problem(torch.optim.Adam, lr=0.05)
    runs = []
    for vectorize in (True, False):
        estimator = cls(problem.unroll, problem.init, particles=6, sigma=1e-2,
                        antithetic=antithetic, seed=7, vectorize=vectorize)  # fmt: skip
        runs.append([estimator.step(problem.meta(), x, y) for x, y in truncations(xs, ys)])
    for a, b in zip(*runs):
        for x, y in zip(a.grads + a.stderr + [a.loss], b.grads + b.stderr + [b.loss]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


def test_without_antithetic_pairs_pes_is_still_unbiased() -> None:
    """Plain draws, weighed by the loss itself: more variance, the same mean."""

    def unroll(meta: list[torch.Tensor], s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = 0.5 * s + meta[0]
        return s, (s - 1) ** 2

    theta = [torch.tensor(0.3, dtype=torch.float64)]
    exact = est.TruncatedBackprop(lambda m, s: _chain(unroll, m, s, 4), lambda m: m[0] * 0)
    want = exact.step(theta).grads[0]
    pes = est.PES(unroll, lambda m: m[0] * 0, particles=20000, sigma=0.01, antithetic=False,
                  seed=11)  # fmt: skip
    steps = [pes.step(theta) for _ in range(4)]
    got = sum(e.grads[0] for e in steps)
    bound = sum(e.stderr[0] for e in steps)
    assert abs(float(got - want)) < 4 * float(bound), (got, want, bound)
    assert float(bound) < 0.5 * abs(float(want))


def _chain(unroll: Any, meta: list[torch.Tensor], s: Any, n: int) -> tuple[Any, torch.Tensor]:
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(n):
        s, loss = unroll(meta, s)
        total = total + loss
    return s, total


def test_reset_starts_every_particle_again() -> None:
    _, _, problem, xs, ys = make_problem()
    meta = problem.meta()
    a = est.PES(problem.unroll, problem.init, particles=4, sigma=1e-2, seed=3)
    first = a.step(meta, xs[:K], ys[:K])
    a.step(meta, xs[:K], ys[:K])
    a.reset()
    b = est.PES(problem.unroll, problem.init, particles=4, sigma=1e-2, seed=3)
    b.step(meta, xs[:K], ys[:K])
    b.step(meta, xs[:K], ys[:K])
    # after a reset, a's third estimate starts from init: as a first truncation (other noise)
    again = a.step(meta, xs[:K], ys[:K])
    assert again.loss.item() == pytest.approx(first.loss.item(), rel=1e-2)
    assert (b.step(meta, xs[:K], ys[:K]).loss < 0.9 * first.loss).item()


def test_to_grad_feeds_an_ordinary_optimizer() -> None:
    theta = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    outer = torch.optim.SGD([theta], lr=0.1)
    for _ in range(30):
        outer.zero_grad()
        est.es_gradient(lambda m: (m[0] ** 2).sum(), [theta], particles=16, sigma=0.1,
                        seed=0).to_grad([theta])  # fmt: skip
        outer.step()
    assert theta.abs().max().item() < 0.05


def test_the_learning_rate_can_be_learned_in_log_space() -> None:
    _, _, problem, xs, ys = make_problem()

    def unroll(meta: list[torch.Tensor], s: Any, *data: Any) -> Any:
        return problem.unroll([meta[0].exp(), *meta[1:]], s, *data)

    log_lr = torch.tensor(-4.0, dtype=torch.float64)
    meta = [log_lr, *problem.meta()[1:]]
    pes = est.PES(unroll, lambda m: problem.init([m[0].exp(), *m[1:]]), particles=64,
                  sigma=0.05, seed=0)  # fmt: skip
    total = sum(pes.step(meta, x, y).grads[0] for x, y in truncations(xs, ys))
    assert float(total) < 0  # a larger step from lr = e^-4 lowers the training curve


# ---- errors ----------------------------------------------------------------------------------


def test_bad_settings_are_refused_with_what_was_expected() -> None:
    unroll = lambda m, s: (s, m[0].sum())  # noqa: E731
    with pytest.raises(est.EstimatorError, match="even number >= 4"):
        est.PES(unroll, lambda m: (), particles=5)
    with pytest.raises(est.EstimatorError, match="particles must be >= 2"):
        est.PES(unroll, lambda m: (), particles=1, antithetic=False)
    with pytest.raises(est.EstimatorError, match="sigma must be a finite number > 0"):
        est.TruncatedES(unroll, lambda m: (), sigma=0.0)
    with pytest.raises(est.EstimatorError, match="seed must be an int"):
        est.PES(unroll, lambda m: (), seed=1.5)  # type: ignore[arg-type]
    pes = est.PES(unroll, lambda m: ())
    with pytest.raises(est.EstimatorError, match="meta must be a list of tensors"):
        pes.step(torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(est.EstimatorError, match=r"meta-parameter 0 is a torch.int64 tensor"):
        pes.step([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(est.EstimatorError, match="one loss per particle"):
        est.PES(lambda m, s: (s, m[0]), lambda m: ()).step([torch.ones(2)])
    with pytest.raises(est.EstimatorError, match=r"return \(new_state, loss\)"):
        est.PES(lambda m, s: m[0].sum(), lambda m: ()).step([torch.ones(2)])
    with pytest.raises(est.EstimatorError, match="one loss per particle"):
        est.TruncatedBackprop(lambda m, s: (s, m[0]), lambda m: ()).step([torch.ones(2)])
    pes.step([torch.ones(2)])
    with pytest.raises(est.EstimatorError, match=r"changed shape.*reset"):
        pes.step([torch.ones(3)])
    with pytest.raises(est.EstimatorError, match="to_grad got 2 tensors for an estimate of 1"):
        pes.step([torch.ones(2)]).to_grad([torch.ones(2), torch.ones(1)])


def test_particles_whose_states_differ_in_python_values_are_refused() -> None:
    def unroll(meta: list[torch.Tensor], s: Any) -> Any:
        return {"flag": bool(meta[0] > 0)}, meta[0].sum()

    pes = est.PES(unroll, lambda m: {}, particles=4, sigma=10.0, seed=0, vectorize=False)
    with pytest.raises(est.EstimatorError, match="states differ in more than their tensors"):
        pes.step([torch.zeros(())])


def test_inner_problem_refuses_what_it_cannot_run() -> None:
    net, xs, ys = problem_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(est.EstimatorError, match=r"SGD has no option 'beta'.*'lr'"):
        est.InnerProblem(net, opt, mse, hyper=["beta"])
    adam = torch.optim.Adam(net.parameters(), lr=0.1)
    with pytest.raises(est.EstimatorError, match=r"option 'betas' is .*one number or one tensor"):
        est.InnerProblem(net, adam, mse, hyper=["betas"])
    with pytest.raises(higher.UsageError, match=r"must be a torch.optim.Optimizer"):
        est.InnerProblem(net, object(), mse)  # type: ignore[arg-type]
    problem = est.InnerProblem(net, opt, mse, hyper=["lr"], weights=True)
    with pytest.raises(est.EstimatorError, match=r"expected 2 meta-parameters \(1 option"):
        problem.init([torch.tensor(0.1)])
    meta = problem.meta()
    with pytest.raises(est.EstimatorError, match="step dimension first"):
        problem.unroll(meta, problem.init(meta), xs[0, 0], ys[:2])
    frozen = torch.nn.Linear(2, 1)
    frozen.requires_grad_(False)
    with pytest.raises(est.EstimatorError, match="no parameter of the model requires grad"):
        est.InnerProblem(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), mse)


# ---- over processes --------------------------------------------------------------------------


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_estimator_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_estimate_what_one_process_does(tmp_path: Path) -> None:
    """Each rank runs its share of the draws (2 and 1 pairs); the reduced estimates equal one
    process's, and an unseeded estimator draws the same noise on every rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, str(WORKER), "--world-size", "2", "--store", str(tmp_path / "s"),
               "--out", str(tmp_path)]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*command, "--rank", str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _load_worker().run(4)
    for got in (ranks[0]["seeded"], ranks[1]["seeded"]):
        for step_got, step_want in zip(got, single, strict=True):
            for a, b in zip(step_got, step_want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(ranks[0]["unseeded"], ranks[1]["unseeded"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_running_statistics_are_each_particles_own() -> None:
    """BatchNorm in training mode: every particle updates its own running statistics (vmapped
    or looped alike), and the model's stay as they were."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    problem = est.InnerProblem(net, torch.optim.Adam(net.parameters(), lr=0.01), mse, hyper="lr")
    x, y = torch.randn(4, 8, 3).double(), torch.randn(4, 8, 1).double()
    runs = []
    for cls in (est.PES, est.TruncatedES):
        for vectorize in (True, False):
            estimator = cls(problem.unroll, problem.init, particles=4, sigma=1e-3, seed=0,
                            vectorize=vectorize)  # fmt: skip
            runs.append(
                [estimator.step(problem.meta(), x[k : k + 2], y[k : k + 2]) for k in (0, 2)]
            )
    for a, b in (runs[:2], runs[2:]):
        for ea, eb in zip(a, b):
            torch.testing.assert_close(ea.grads, eb.grads, rtol=1e-9, atol=1e-12)
    assert not torch.equal(runs[0][1].grads[0], runs[2][1].grads[0])  # PES is not TES
    assert torch.equal(
        dict(net.named_buffers())["1.running_mean"], torch.zeros(4, dtype=torch.float64)
    )


def reference_pes(
    problem: est.InnerProblem, meta: list[torch.Tensor], pairs: int, sigma: float, seed: int
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """PES written out, pair by pair: per truncation each pair's draw of the gradient, and
    each pair's sum of them (the noise drawn as the estimator draws it)."""
    _, _, _, xs, ys = make_problem()
    gen = torch.Generator().manual_seed(seed)
    states: dict[tuple[int, int], Any] = {}
    xi: list[torch.Tensor] | None = None
    per_step: list[list[torch.Tensor]] = []
    sums = [[torch.zeros_like(m) for m in meta] for _ in range(pairs)]
    for x, y in truncations(xs, ys):
        eps = [torch.randn((pairs, *m.shape), generator=gen, dtype=m.dtype) * sigma for m in meta]
        xi = eps if xi is None else [a + b for a, b in zip(xi, eps)]
        draws = []
        for p in range(pairs):
            losses = []
            for sign in (1, -1):
                mine = [m + sign * e[p] for m, e in zip(meta, eps)]
                state = states.get((p, sign)) or problem.init(mine)
                states[p, sign], loss = problem.unroll(mine, state, x, y)
                losses.append(loss)
            draw = [x_[p] * (losses[0] - losses[1]) / (2 * sigma**2) for x_ in xi]
            sums[p] = [a + b for a, b in zip(sums[p], draw)]
            draws.append(draw)
        per_step.append([torch.stack([d[i] for d in draws]) for i in range(len(meta))])
    return per_step, [torch.stack([s_[i] for s_ in sums]) for i in range(len(meta))]


def test_pes_and_its_accumulated_estimate_are_pes_written_out() -> None:
    """Each truncation's estimate is the mean of the pairs' draws and its standard error their
    spread; `accumulated` is the sum over the truncations with the spread of each pair's own
    sum (the truncations share their particles, so the steps' errors do not add up)."""
    _, _, problem, xs, ys = make_problem()
    meta = problem.meta()
    pes = est.PES(problem.unroll, problem.init, particles=8, sigma=1e-2, seed=4)
    steps = [pes.step(meta, x, y) for x, y in truncations(xs, ys)]
    per_step, sums = reference_pes(problem, meta, pairs=4, sigma=1e-2, seed=4)
    for e, draws in zip(steps, per_step):
        for i, d in enumerate(draws):
            torch.testing.assert_close(e.grads[i], d.mean(0), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(e.stderr[i], d.std(0) / 2, rtol=1e-8, atol=1e-12)
    total = pes.accumulated()
    for i, d in enumerate(sums):
        torch.testing.assert_close(total.grads[i], d.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total.stderr[i], d.std(0) / 2, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(total.loss, sum(e.loss for e in steps))
    tbptt = est.TruncatedBackprop(problem.unroll, problem.init)
    exact = [tbptt.step(meta, x, y) for x, y in truncations(xs, ys)]
    torch.testing.assert_close(tbptt.accumulated().grads[0], sum(e.grads[0] for e in exact))
    pes.reset()
    with pytest.raises(est.EstimatorError, match="no truncation has run"):
        pes.accumulated()
