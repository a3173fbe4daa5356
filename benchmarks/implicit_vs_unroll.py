"""Unrolled vs implicit hypergradients on the example's problem: error against cost.

The problem is `examples/hpo_l2_implicit.py`'s: softmax regression on scikit-learn's digits with
one L2 penalty per pixel, at a fixed penalty (`--log-penalty`). Each contender runs K inner
steps from zero (gradient descent through `higher.optim`, but for the last one) and returns
d validation loss / d log-penalties:

- unrolled: the K steps are differentiated through (the graph of every step is kept);
- implicit: the K steps run without a graph, then `higher.implicit.hypergrad` (CG) at the last
  iterate, as if it were the optimum;
- implicit, L-BFGS inner: K iterations of torch.optim.LBFGS instead (no graph), then the same:
  the implicit hypergradient lets the inner problem be solved by anything.

The reference is the implicit hypergradient at the true optimum (L-BFGS to a gradient of 1e-12,
then a dense solve), in float64. A new contender (a truncated unroll, a recompute mode) is one
more entry of `CONTENDERS`.

    python benchmarks/implicit_vs_unroll.py    # writes results/implicit_vs_unroll.{md,json,png}
    python benchmarks/implicit_vs_unroll.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # the examples

from _peers_common import tensor_peak

import higher
from examples.hpo_l2_implicit import Config, Data, inner_loss, load_data, model_loss, solve_inner
from higher.implicit import CG, Direct, hypergrad

HERE = Path(__file__).parent
Tensor = torch.Tensor
NAMES = ("weight", "bias")


@dataclass
class Problem:
    data: Data
    cfg: Config
    log_penalty: Tensor  # requires grad
    lr: float  # of the inner gradient descent

    def inner(self, params: list[Tensor], h: Tensor) -> Tensor:
        return inner_loss(dict(zip(NAMES, params)), h, self.data, self.cfg)

    def outer(self, params: list[Tensor], h: Tensor) -> Tensor:
        return model_loss(dict(zip(NAMES, params)), self.data.val)

    def start(self) -> list[Tensor]:
        d = self.data.train.x.shape[1]
        return [torch.zeros(d, 10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)]


def descend(problem: Problem, steps: int, track: bool) -> list[Tensor]:
    """`steps` of gradient descent on the inner loss with a differentiable SGD of higher.optim
    (`track`: keep the graph of every step, so the result is differentiable in the penalty)."""
    start = problem.start()
    opt = higher.create_diff_optim(
        torch.optim.SGD, {"lr": problem.lr}, params=start, track_higher_grads=track
    )
    params = [p.requires_grad_() for p in start]
    for _ in range(steps):
        params = opt.step(problem.inner(params, problem.log_penalty), params=params)
    return params


def unrolled(problem: Problem, steps: int) -> list[Tensor]:
    params = descend(problem, steps, track=True)
    loss = problem.outer(params, problem.log_penalty)
    return list(torch.autograd.grad(loss, problem.log_penalty))


def implicit(problem: Problem, steps: int) -> list[Tensor]:
    params = [p.detach() for p in descend(problem, steps, track=False)]
    solver = CG(tol=1e-10, maxiter=1000)
    # the error at points short of the optimum is what is measured: no stationarity warning
    return hypergrad(problem.inner, problem.outer, params, problem.log_penalty, solver=solver,
                     stationarity_tol=None).grads  # fmt: skip


def implicit_after_lbfgs(problem: Problem, steps: int) -> list[Tensor]:
    """`steps` iterations of torch.optim.LBFGS instead of gradient descent: a solver nobody
    would differentiate through, which the implicit hypergradient does not need to."""
    params = [p.requires_grad_() for p in problem.start()]
    lbfgs = torch.optim.LBFGS(params, max_iter=steps, tolerance_grad=1e-12, tolerance_change=0.0,
                              history_size=20, line_search_fn="strong_wolfe")  # fmt: skip
    h = problem.log_penalty.detach()

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = problem.inner(params, h)
        loss.backward()
        return loss

    lbfgs.step(closure)
    solver = CG(tol=1e-10, maxiter=1000)
    solution = [p.detach() for p in params]
    return hypergrad(problem.inner, problem.outer, solution, problem.log_penalty,
                     solver=solver, stationarity_tol=None).grads  # fmt: skip


class Weights(torch.nn.Module):
    """The softmax regression's weights as a module, for `innerloop_ctx` and its memory modes."""

    def __init__(self, start: list[Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(start[0])
        self.bias = torch.nn.Parameter(start[1])


def unrolled_in(unroll: Callable[[int], Any]) -> Callable[[Problem, int], list[Tensor]]:
    """The unrolled hypergradient in a memory mode of `innerloop_ctx` (`unroll(steps)`)."""

    def contender(problem: Problem, steps: int) -> list[Tensor]:
        model = Weights(problem.start())
        opt = torch.optim.SGD(model.parameters(), lr=problem.lr)
        with higher.innerloop_ctx(model, opt, unroll=unroll(steps)) as (fmodel, diffopt):

            def inner() -> Tensor:  # the fast weights of the step it rebuilds, in recompute
                return problem.inner(list(fmodel.parameters()), problem.log_penalty)

            for _ in range(steps):
                diffopt.step(closure=inner)
            loss = problem.outer(list(fmodel.parameters()), problem.log_penalty)
            return list(torch.autograd.grad(loss, problem.log_penalty))

    return contender


#: name -> hypergradient after `steps` inner steps.
CONTENDERS: dict[str, Callable[[Problem, int], list[Tensor]]] = {
    "unrolled": unrolled,
    # the same hypergradient as "unrolled", rebuilding each step in the backward pass
    "unrolled, recompute": unrolled_in(lambda steps: higher.Recompute()),
    # backpropagation through the last tenth of the steps only: biased, cheaper
    "truncated (last 10%)": unrolled_in(lambda steps: higher.Truncated(window=max(1, steps // 10))),
    "implicit (CG)": implicit,
    "implicit (CG), L-BFGS inner": implicit_after_lbfgs,
}


def reference(problem: Problem) -> Tensor:
    """The hypergradient at the true optimum (L-BFGS, then Newton's method to round-off, then a
    dense solve)."""
    start = dict(zip(NAMES, problem.start()))
    optimum = solve_inner(start, problem.log_penalty, problem.data, problem.cfg)
    flat = torch.cat([optimum[n].reshape(-1) for n in NAMES])
    shapes = [optimum[n].shape for n in NAMES]
    h = problem.log_penalty.detach()

    def objective(flat: Tensor) -> Tensor:
        parts = flat.split([s.numel() for s in shapes])
        return problem.inner([t.view(s) for t, s in zip(parts, shapes)], h)

    for _ in range(3):  # L-BFGS stalls near 1e-9 (its line search meets round-off)
        grad = torch.autograd.functional.jacobian(objective, flat)
        hess = torch.autograd.functional.hessian(objective, flat)
        flat = flat - torch.linalg.solve(hess, grad)
    residual = float(torch.autograd.functional.jacobian(objective, flat).abs().max())
    assert residual < 1e-12, f"the reference optimum is not one: gradient {residual:.1e}"
    params = [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
    solver = Direct(tol=1e-12)
    g: Tensor = hypergrad(
        problem.inner, problem.outer, params, problem.log_penalty, solver=solver
    ).grads[0]
    return g


def measure(
    problem: Problem, steps_list: list[int], reps: int, ref: Tensor
) -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
    for steps in steps_list:
        for name, contender in CONTENDERS.items():
            seconds = []
            for _ in range(reps):
                start = time.perf_counter()
                grad = contender(problem, steps)[0]
                seconds.append(time.perf_counter() - start)
            peak, _ = tensor_peak(lambda: contender(problem, steps))  # noqa: B023 (called here)
            error = float((grad - ref).abs().max() / ref.abs().max())
            rows[name].append(
                {
                    "steps": steps,
                    "ms": statistics.median(seconds) * 1e3,
                    "peak_mib": peak,
                    "error": error,
                }
            )
            print(f"{name:16} K={steps:5d}  error {error:.1e}  {rows[name][-1]['ms']:8.1f} ms  "
                  f"peak {peak:7.1f} MiB", file=sys.stderr)  # fmt: skip
    return rows


def table(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# Unrolled vs implicit hypergradients (examples/hpo_l2_implicit.py's problem)",
        "",
        f"Run {result['started']}, torch {result['torch']}, {a['threads']} thread(s), "
        f"{a['reps']} timed repetitions (median){' (smoke sizes)' if a['smoke'] else ''}. "
        f"Problem: softmax regression on digits (359 training images, 64 pixels + bias: "
        f"650 weights), log-penalty {a['log_penalty']} on every pixel; inner optimizer: K "
        f"steps of gradient descent (lr {a['lr']}) from zero. Error: max |g - g*| / max |g*| "
        "against the hypergradient at the true optimum. Peak: the most MiB held at once by the "
        "tensors the hypergradient's computation makes (inner steps, graph, backward; counted "
        "by storage, benchmarks/_peers_common.py's tensor_peak).",
        "",
        "| contender | K inner steps | error | time ms | peak MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in result["rows"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['steps']} | {r['error']:.1e} | {r['ms']:.1f} "
                f"| {r['peak_mib']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for name, rows in result["rows"].items():
        steps = [r["steps"] for r in rows]
        ax.loglog([r["ms"] for r in rows], [r["error"] for r in rows], "o-", label=name)
        for r in rows:
            ax.annotate(f"K={r['steps']}", (r["ms"], r["error"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        bx.loglog(steps, [max(r["peak_mib"], 1e-3) for r in rows], "o-", label=name)
    ax.set(xlabel="time of one hypergradient (ms)", ylabel="relative error")
    ax.set_title("error vs time (K = inner steps)", fontsize="medium")
    bx.set(xlabel="K inner steps", ylabel="peak MiB held by tensors")
    bx.set_title("memory against K", fontsize="medium")
    for axis in (ax, bx):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--log-penalty", type=float, default=-2.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="K = 5, 20; one repetition")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.reps = [5, 20], 1
    torch.set_num_threads(args.threads)
    data = load_data(Config.seed)
    d = data.train.x.shape[1]
    h = torch.full((d,), args.log_penalty, dtype=torch.float64, requires_grad=True)
    problem = Problem(data, Config(), h, args.lr)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    ref = reference(problem)
    result = {
        "started": started,
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": measure(problem, args.steps, args.reps, ref),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (args.out / "implicit_vs_unroll.md").write_text(text)
    (args.out / "implicit_vs_unroll.json").write_text(json.dumps(result, indent=1))
    chart(result, args.out / "implicit_vs_unroll.png")
    print(text)


if __name__ == "__main__":
    main()
