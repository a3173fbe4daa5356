"""One contender of benchmarks/step_overhead.py: microseconds per inner step of a 2-layer MLP.

    python _step_worker.py --library this|this-compiled|legacy|torchopt|torch.func \
        --optimizer sgd|adam --steps K --reps R --threads T

Prints one JSON line: the median over `reps` meta-steps of the unroll alone and of the whole
meta-step (unroll, meta-loss, its gradient with respect to the initial weights), each per inner
step, and the autograd nodes one inner step adds to the meta-loss's graph. `legacy` runs the
same code as `this` under higher 0.2.1 (run it with a Python whose venv has it).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: what a contender's meta-step returns: the meta-loss (for the graph count) and the time
#: the unroll took
Unroll = Callable[[int], tuple[Tensor, float]]
LR = {"sgd": 0.01, "adam": 1e-3}


def problem() -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The MLP (32 -> 64 -> 1, tanh) and a support and a query batch of 64, from seed 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(1)
    data = tuple(torch.randn(64, n, generator=g) for n in (32, 1, 32, 1))
    return model, (data[0], data[1], data[2], data[3])


def torch_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR[name])
    return torch.optim.Adam(model.parameters(), lr=LR[name])


def loss_fn(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def higher_unroll(model: nn.Module, optimizer: str, data: tuple[Tensor, ...],
                  compiled: bool) -> Unroll:  # fmt: skip
    """`higher.innerloop_ctx` as MAML code writes it (this project, or higher 0.2.1)."""
    import higher

    xs, ys, xq, yq = data
    opt = torch_optimizer(model, optimizer)

    def run(steps: int) -> tuple[Tensor, float]:
        start = time.perf_counter()
        context = (
            higher.innerloop_ctx(model, opt, copy_initial_weights=False, compile=True)
            if compiled  # (higher 0.2.1 has no compile=)
            else higher.innerloop_ctx(model, opt, copy_initial_weights=False)
        )
        with context as (fmodel, diffopt):
            for _ in range(steps):
                if compiled:
                    diffopt.step(closure=functools.partial(loss_fn, fmodel, xs, ys))
                else:
                    diffopt.step(loss_fn(fmodel, xs, ys))
            unrolled = time.perf_counter() - start
            return loss_fn(fmodel, xq, yq), unrolled

    return run


def torchopt_unroll(model: nn.Module, optimizer: str, data: tuple[Tensor, ...]) -> Unroll:
    """TorchOpt's `MetaSGD`/`MetaAdam`, restored after each meta-step as its MAML example does."""
    import torchopt  # type: ignore[import-not-found]

    xs, ys, xq, yq = data
    if optimizer == "sgd":
        inner = torchopt.MetaSGD(model, lr=LR[optimizer])
    else:
        inner = torchopt.MetaAdam(model, lr=LR[optimizer])
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner, by="reference")

    def run(steps: int) -> tuple[Tensor, float]:
        start = time.perf_counter()  # the restore is this library's setup of an inner loop
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner, opt_state)
        for _ in range(steps):
            inner.step(loss_fn(model, xs, ys))
        unrolled = time.perf_counter() - start
        return loss_fn(model, xq, yq), unrolled

    return run


def func_unroll(model: nn.Module, optimizer: str, data: tuple[Tensor, ...]) -> Unroll:
    """The unroll by hand: `torch.func.functional_call`, autograd and the update written out
    (torch.optim's SGD, or its Adam with bias correction)."""
    xs, ys, xq, yq = data
    names = [name for name, _ in model.named_parameters()]
    initial: list[Tensor] = list(model.parameters())
    lr, (b1, b2), eps = LR[optimizer], (0.9, 0.999), 1e-8

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        assert isinstance(out, Tensor)
        return out

    def run(steps: int) -> tuple[Tensor, float]:
        start = time.perf_counter()
        params: list[Tensor] = list(initial)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        for t in range(1, steps + 1):
            loss = F.mse_loss(forward(params, xs), ys)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            if optimizer == "sgd":
                params = [p - lr * g for p, g in zip(params, grads)]
                continue
            m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
            v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grads)]
            c1, c2 = 1 - b1**t, 1 - b2**t
            params = [
                p - (lr / c1) * a / ((b.sqrt() / c2**0.5) + eps) for p, a, b in zip(params, m, v)
            ]
        unrolled = time.perf_counter() - start
        return F.mse_loss(forward(params, xq), yq), unrolled

    return run


def nodes(t: Tensor) -> int:
    """The autograd nodes the graph of `t` reaches."""
    seen: set[Any] = set()
    todo = [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = problem()
    if args.library in ("this", "legacy", "this-compiled"):
        run = higher_unroll(model, args.optimizer, data, args.library == "this-compiled")
        version = metadata.version("higher-core" if args.library != "legacy" else "higher")
    elif args.library == "torchopt":
        run, version = torchopt_unroll(model, args.optimizer, data), metadata.version("torchopt")
    elif args.library == "torch.func":
        run, version = func_unroll(model, args.optimizer, data), f"torch {torch.__version__}"
    else:
        raise SystemExit(f"unknown library {args.library!r}")
    wrt = list(model.parameters())
    half = max(args.steps // 2, 1)
    count = (nodes(run(args.steps)[0]) - nodes(run(half)[0])) / (args.steps - half)
    for _ in range(3):  # warm-up (and compilation, for the compiled step)
        torch.autograd.grad(run(args.steps)[0], wrt)
    unroll, whole = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        meta, unrolled = run(args.steps)
        torch.autograd.grad(meta, wrt)
        whole.append((time.perf_counter() - start) / args.steps * 1e6)
        unroll.append(unrolled / args.steps * 1e6)
    print(json.dumps({"library": args.library, "optimizer": args.optimizer, "version": version,
                      "unroll_us": statistics.median(unroll), "meta_us": statistics.median(whole),
                      "nodes_per_step": count}))  # fmt: skip


if __name__ == "__main__":
    main()
