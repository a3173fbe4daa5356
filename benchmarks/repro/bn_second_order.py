"""Minimal reproduction, for the torch issue tracker: the second-order gradient through
BatchNorm in training mode (batch statistics) is wrong under `torch.compile` and under
`torch.func.vmap(torch.func.grad(...))`, while eager autograd (and autograd through a vmapped
forward) is right.

The quantity: one inner SGD step w1 = w - lr * d loss(w; x) / dw on a BatchNorm2d model, then
d loss(w1; x) / dw — a second-order derivative (MAML). Four ways, float64:

  eager         torch.autograd.grad(create_graph=True) — the reference
  compiled      the same function under torch.compile (backend aot_eager: dynamo + AOTAutograd,
                no inductor code generation involved)
  vmap(grad)    per sample of a batch of 2 tasks, vmap over torch.func.grad
  grad(vmap)    autograd through the vmapped forward (what higher.batched_innerloop_ctx does)

Run: python benchmarks/repro/bn_second_order.py ; exit status 1 when a way disagrees with eager.
No dependency besides torch. Eval mode (running statistics) agrees everywhere, as does the
forward value and the first-order gradient: only the second-order term through the batch mean
and variance differs.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

torch.manual_seed(0)
DT = torch.float64
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 3, 3, bias=False), torch.nn.BatchNorm2d(3, track_running_stats=False),
    torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2),
).to(DT)  # fmt: skip
names = [n for n, _ in net.named_parameters()]
x = torch.randn(2, 5, 1, 6, 6, dtype=DT)  # 2 tasks of 5 images
y = torch.randint(0, 2, (2, 5))
LR = 0.5


def loss(params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(net, dict(zip(names, params)), (xb,)), yb)


def maml_eager(params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    g = torch.autograd.grad(loss(params, xb, yb), params, create_graph=True)
    return loss([p - LR * gi for p, gi in zip(params, g)], xb, yb)


def maml_functional(params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    g = grad(loss)(params, xb, yb)
    return loss([p - LR * gi for p, gi in zip(params, g)], xb, yb)


def main() -> int:
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ref = [torch.autograd.grad(maml_eager(params, x[t], y[t]), params) for t in range(2)]
    ref_sum = [a + b for a, b in zip(*ref)]
    results = {}
    compiled = torch.compile(maml_functional, backend="aot_eager", fullgraph=True)
    results["compiled"] = torch.autograd.grad(compiled(params, x[0], y[0]), params)
    results["eager torch.func"] = torch.autograd.grad(maml_functional(params, x[0], y[0]), params)
    per_task = vmap(maml_functional, in_dims=(None, 0, 0))(params, x, y)
    results["vmap(grad)"] = torch.autograd.grad(per_task.sum(), params)

    stacked = [p.expand(2, *p.shape) for p in params]
    inner = torch.autograd.grad(vmap(loss)(stacked, x, y).sum(), stacked, create_graph=True)
    adapted = [p - LR * g for p, g in zip(stacked, inner)]
    results["grad(vmap)"] = torch.autograd.grad(vmap(loss)(adapted, x, y).sum(), params)

    print(f"torch {torch.__version__}: max |g - g_eager| / max |g_eager| (float64)")
    wrong = False
    for name, got in results.items():
        want = ref[0] if name in ("compiled", "eager torch.func") else ref_sum
        a = torch.cat([g.flatten() for g in got])
        b = torch.cat([g.flatten() for g in want])
        err = float((a - b).abs().max() / b.abs().max())
        print(f"  {name:>16}: {err:.1e}{'   <-- wrong' if err > 1e-10 else ''}")
        wrong |= err > 1e-10
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
