"""Where one inner step goes: eager `diffopt.step`, `higher.compile_step`, and hand-written
`torch.func` + `torch.compile`, on the `long` workload of peers.py (100 SGD steps, one process).

For each: the median over meta-steps of the unroll and of the meta-backward, per inner step;
for `compile_step` the unroll is split into the compiled call and this project's Python around
it. Compilation happens in warm-up meta-steps that are not measured.

    python benchmarks/compiled_step.py --threads 1 --meta-steps 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import higher

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import Sizes, make_problem

Timing = tuple[float, float, float]  # unroll, meta-backward, time inside the compiled call


def mse(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--meta-steps", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 meta-steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    meta_steps = 2 if args.smoke else args.meta_steps
    problem = make_problem("long", sizes)
    model, (xs, ys, xq, yq), steps = problem.model, problem.tasks[0], problem.steps
    opt = torch.optim.SGD(model.parameters(), lr=problem.lr)
    inside = [0.0]
    real_compile = torch.compile

    def timing_compile(function: Any, **options: Any) -> Any:
        """torch.compile, its result timed: compile_step compiles through it at its first
        call, so the time inside the compiled call is measured without reaching into the
        step (the hand-written contender below compiles with the real one)."""
        compiled: Callable[..., Any] = real_compile(function, **options)

        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return compiled(*a, **k)
            finally:
                inside[0] += time.perf_counter() - start

        return timed

    torch.compile = timing_compile  # type: ignore[assignment]
    step = higher.compile_step(mse)

    def ours(compiled: bool) -> Timing:
        inside[0] = 0.0
        start = time.perf_counter()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                if compiled:
                    step(fmodel, diffopt, xs, ys)
                else:
                    diffopt.step(mse(fmodel, xs, ys))
            middle = time.perf_counter()
            torch.autograd.grad(mse(fmodel, xq, yq), list(model.parameters()))
        return middle - start, time.perf_counter() - middle, inside[0]

    names = [n for n, _ in model.named_parameters()]

    def loss_of(params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> Any:
        return F.mse_loss(functional_call(model, dict(zip(names, params)), (x,)), y)

    def sgd(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        grads = grad(loss_of)(params, xs, ys)
        return tuple(p - problem.lr * g for p, g in zip(params, grads))

    hand_step = real_compile(sgd, fullgraph=True)

    def hand() -> Timing:
        start = time.perf_counter()
        first: tuple[torch.Tensor, ...] = tuple(model.parameters())
        params = first
        for _ in range(steps):
            params = hand_step(params)
        middle = time.perf_counter()
        torch.autograd.grad(loss_of(params, xq, yq), first)
        return middle - start, time.perf_counter() - middle, middle - start

    contenders: dict[str, Callable[[], Timing]] = {
        "eager diffopt.step": lambda: ours(False),
        "higher.compile_step": lambda: ours(True),
        "torch.func + torch.compile": hand,
    }
    samples: dict[str, list[Timing]] = {name: [] for name in contenders}
    for run in contenders.values():  # warm-up: compiles
        run()
        run()
    for _ in range(meta_steps):  # alternate, so drift cancels
        for name, run in contenders.items():
            samples[name].append(run())
    print(f"long: {steps} inner steps, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'µs per inner step':30} {'unroll':>8} {'(compiled call)':>16} {'meta-backward':>14}")
    for name, rows in samples.items():
        unroll, backward, call = (statistics.median(r[k] for r in rows) for k in range(3))
        scale = 1e6 / steps
        shown = f"{call * scale:.0f}" if name != "eager diffopt.step" else "–"
        print(f"{name:30} {unroll * scale:8.0f} {shown:>16} {backward * scale:14.0f}")


if __name__ == "__main__":
    main()
