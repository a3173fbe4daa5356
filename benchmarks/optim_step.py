"""A differentiable Adam step on 100 small tensors: higher.optim vs a per-tensor loop vs TorchOpt.

    python benchmarks/optim_step.py                          # higher.optim vs the per-tensor loop
    python benchmarks/optim_step.py --torchopt-python PY     # ... and TorchOpt 0.7.3 in venv PY
    nox -s bench-optim                                       # builds that venv, runs all three

Each measurement unrolls 5 differentiable Adam steps (gradients with create_graph, as in MAML)
and backpropagates a meta-loss through them, so the forward and the backward of the update
count. "higher.optim" is the functional rule
(`functional.adam`), "DifferentiableAdam" the object API (`get_diff_optim(...).step(loss)`).
Timings are per unrolled step (best median over repeats, microseconds); ratios are
against the per-tensor loop. "plain SGD loop" is the floor every method shares (the inner
gradients and an update of one op per tensor); on a quiet machine, (method - floor) /
(loop - floor) is the cost of the Adam update itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

N_TENSORS = 100
STEPS = 5
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


Problem = tuple[list[torch.Tensor], Callable[..., torch.Tensor], Callable[..., list[torch.Tensor]]]


def make_problem(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 16) if i % 2 == 0 else (16,) for i in range(N_TENSORS)]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=gen) for s in shapes]

    def loss(current: list[torch.Tensor]) -> torch.Tensor:
        terms = [((p - t) ** 2).sum() for p, t in zip(current, targets, strict=True)]
        return torch.stack(terms).sum()

    def grads(current: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss(current), current, create_graph=True))

    return params, loss, grads


def loop_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    step: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The per-tensor Python loop a hand-written differentiable Adam is."""
    beta1, beta2 = BETAS
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    new, new_m, new_v = [], [], []
    for p, g, m_i, v_i in zip(params, grads, m, v, strict=True):
        m_i = m_i * beta1 + (1 - beta1) * g
        v_i = v_i * beta2 + (1 - beta2) * g * g
        denom = v_i.sqrt() / bc2**0.5 + EPS
        new.append(p - (LR / bc1) * (m_i / denom))
        new_m.append(m_i)
        new_v.append(v_i)
    return new, new_m, new_v


def timeit(
    fns: dict[str, Callable[[], Any]], repeats: int = 7, number: int = 5
) -> dict[str, float]:
    """Per unrolled step, in microseconds: the best over `repeats` of the median of `number`
    runs. The methods take turns run by run, so a busy machine slows them alike."""
    for fn in fns.values():
        fn()  # warm up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(number):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - start)
        for name in fns:
            best[name] = min(best[name], statistics.median(runs[name]))
    return {name: seconds * 1e6 / STEPS for name, seconds in best.items()}


def _meta_backward(params: list[torch.Tensor]) -> None:
    torch.autograd.backward(torch.stack([p.sum() for p in params]).sum())


def measure_higher() -> dict[str, float]:
    import higher.optim
    from higher.optim import functional as F

    start, loss, grads = make_problem()
    tx = F.adam(lr=LR, betas=BETAS, eps=EPS)

    def ours() -> None:
        params, state = start, tx.init(start)
        for _ in range(STEPS):
            params, state = tx.step(grads(params), state, params)
        _meta_backward(params)

    def ours_object() -> None:
        opt = torch.optim.Adam(start, lr=LR, betas=BETAS, eps=EPS)
        diffopt = higher.optim.get_diff_optim(opt, start)
        params = start
        for _ in range(STEPS):
            params = diffopt.step(loss(params), params=params)
        _meta_backward(params)

    def loop() -> None:
        params = start
        m = [torch.zeros_like(p) for p in start]
        v = [torch.zeros_like(p) for p in start]
        for k in range(STEPS):
            params, m, v = loop_adam(params, grads(params), m, v, k + 1)
        _meta_backward(params)

    def gradients_only() -> None:
        params = start
        for _ in range(STEPS):
            params = [p - 1e-3 * g for p, g in zip(params, grads(params), strict=True)]
        _meta_backward(params)

    return timeit(
        {
            "higher.optim": ours,
            "DifferentiableAdam": ours_object,
            "per-tensor loop": loop,
            "plain SGD loop": gradients_only,
        }
    )


def measure_torchopt() -> dict[str, float]:
    import torchopt  # type: ignore[import-not-found]

    start, _, grads = make_problem()
    tx = torchopt.adam(lr=LR, betas=BETAS, eps=EPS)

    def theirs() -> None:
        params, state = start, tx.init(start)
        for _ in range(STEPS):
            updates, state = tx.update(grads(params), state, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        _meta_backward(params)

    def loop() -> None:
        params = start
        m = [torch.zeros_like(p) for p in start]
        v = [torch.zeros_like(p) for p in start]
        for k in range(STEPS):
            params, m, v = loop_adam(params, grads(params), m, v, k + 1)
        _meta_backward(params)

    # its own loop, run by turns in the same process: the ratio survives a busy machine
    found = timeit({"torchopt": theirs, "loop": loop})
    return {"torchopt": found["torchopt"], "torchopt / loop": found["torchopt"] / found["loop"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--torchopt-python", help="a Python whose venv has torchopt installed")
    parser.add_argument("--torchopt-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.torchopt_only:
        print(json.dumps(measure_torchopt()))
        return
    results = measure_higher()
    if args.torchopt_python:
        out = subprocess.run(
            [args.torchopt_python, __file__, "--torchopt-only"],
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        # placed on this process's scale by the ratio to the loop measured beside it
        results["torchopt"] = theirs["torchopt / loop"] * results["per-tensor loop"]
    loop = results["per-tensor loop"]
    print(f"torch {torch.__version__}, {N_TENSORS} tensors, {STEPS}-step Adam unroll + backward")
    for name, micros in results.items():
        print(f"  {name:18s} {micros:9.0f} us   {micros / loop:5.2f}x the per-tensor loop")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
