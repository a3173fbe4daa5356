"""Type-checked (mypy --strict) against the INSTALLED wheels: the public API is typed for users."""

from __future__ import annotations

import torch

import higher
import higher.patch

net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
fnet: higher.patch.FunctionalModule = higher.patch.monkeypatch(net, copy_initial_weights=False)
weights: list[torch.Tensor] = fnet.fast_params
fnet.fast_params = [w * 0.5 for w in weights]
first: list[torch.Tensor] = list(fnet.parameters(time=0))
named: dict[str, torch.Tensor] = fnet.named_fast_params()
out = fnet(torch.ones(2, 3), params=named)
higher.patch.buffer_sync(net, fnet)
fnet.write_back_buffers()
stateless = higher.patch.make_functional(net)
tracking: bool = fnet.track_higher_grads
version: str = higher.__version__
error: type[ValueError] = higher.patch.PatchError

# higher-core and higher-optim: the 0.2.1 entry points, typed.
model = torch.nn.Linear(3, 1)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
lr = torch.tensor(0.1, requires_grad=True)
with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (
    fmodel,
    diffopt,
):
    new_params: list[torch.Tensor] = diffopt.step(fmodel(torch.ones(2, 3)).pow(2).sum())
    twin: higher.optim.DifferentiableOptimizer = diffopt
step: higher.CompiledStep = higher.compile_step(lambda m, x: m(x).sum(), backend="eager")
with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
    inner_loss: torch.Tensor = step(fmodel, diffopt, torch.ones(2, 3))
created = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=list(model.parameters()))
hypers = higher.optim.get_trainable_opt_params(opt)
flat: list[object] = higher.utils.flatten([1, [2, 3]])
base: type[Exception] = higher.HigherError
share: list[str] = higher.distributed.shard(["a", "b", "c"], rank=0, world_size=2)
indices: range = higher.distributed.shard(5)
rank_of: int = higher.distributed.world().rank
total_weight: float = higher.distributed.all_reduce_grads(model, weight=len(share))


# One HigherError for the type checker too: every distribution's errors are subclasses of it.
def describe(error: higher.HigherError) -> str:
    return type(error).__name__


described = [
    describe(higher.optim.OptimError("bad lr")),
    describe(higher.patch.PatchError("bad params")),
    describe(higher.UsageError("bad model")),
    describe(higher.distributed.DistributedError("ranks disagree")),
]

# higher.implicit: a hypergradient at an inner solution, typed results.
lam = torch.tensor(1.0, requires_grad=True)
implicit: higher.implicit.Hypergrad = higher.implicit.hypergrad(
    lambda t, h: ((t - 1) ** 2 + h * t**2).sum(),
    lambda t, h: t.sum(),
    torch.tensor([0.5]),
    lam,
    solver=higher.implicit.CG(tol=1e-8),
)
solve: higher.implicit.SolveResult = implicit.solves[0]
iterations: int = solve.iterations
described.append(describe(higher.implicit.ImplicitError("bad hyper")))

# higher-contrib: the finite-difference checker.
import higher.contrib  # noqa: E402  (kept beside its use)

higher.contrib.check_hypergradient(
    lambda w: (w**2).sum().double(), {"w": torch.ones(3, dtype=torch.float64)}
)
