"""The step protocol of the differentiable optimizers: internal, not user API.

For the sibling packages of `higher` (the memory modes, task batching and compiled steps of
`higher`, the conformance kit of `higher.contrib`) and for plugin authors who drive a step
themselves. It is not part of the user API and is not in the API reference: user code calls
`diffopt.step`. Its names change only together with the packages that use them (all `higher`
distributions carry one version and pin each other exactly).

A step is three phases:

    plan = internal.plan(diffopt, params, stepped=..., override=...)  # checks; changes nothing
    result = plan.update(params, grads)                               # pure
    new_params = internal.commit(diffopt, plan, result)               # the only write

A step with the last one's signature (the fast weights that step committed, the same options
and parameters stepped) may reuse its plan: `internal.remember(diffopt, plan, stepped, new)`
after the commit, then `internal.repeat_plan(diffopt, params, stepped)` gives the next plan, or
None where anything changed (then `plan`). `diffopt.step` and the compiled step do this.

`compute_step(diffopt, loss)` is the first two for a loss computed at the current parameters
(gradients, the plan of those they step, the update): `diffopt.step(loss)` is it, then
`commit`; so is each step of a memory mode that takes a loss or runs its closure.

What it guarantees:

- `plan` checks the parameters and the override and changes nothing.
- `StepPlan.update` (and `StepPlan.run`, for gradients known to be right) is a pure function of
  its inputs: it may run again, traced, under `torch.func.vmap` or during a backward pass;
  `states=` and `plan._replace(buckets=...)` run it from other states or hyperparameters.
- `commit` is the only phase that changes the optimizer (and its functional model), and it
  either stores everything or raises having changed nothing. A plan is bound to the optimizer
  that made it and to the state it made it from: a plan of another optimizer (of any class), a
  stale plan (the optimizer stepped, committed or loaded a state since) or a plan committed
  already is refused with `higher.optim.OptimError`.
- `set_step_driver(diffopt, driver)` hands `diffopt.step` to `driver` for that one optimizer
  (a memory mode of `higher.innerloop_ctx` uses it); `type(diffopt)` stays the twin's class.

Examples:
    >>> import torch, higher.optim
    >>> from higher.optim import internal
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
    >>> plan = internal.plan(diffopt, [w])
    >>> internal.commit(diffopt, plan, plan.update([w], [torch.ones(2)]))[0].tolist()
    [0.5, 0.5]
"""

from ._protocol import commit as commit
from ._protocol import compute_step as compute_step
from ._protocol import plan as plan
from ._protocol import remember as remember
from ._protocol import repeat_plan as repeat_plan
from ._protocol import set_step_driver as set_step_driver
from ._protocol import step_driver as step_driver
from ._shell import StepDriver as StepDriver
from ._step import Bucket as Bucket
from ._step import StepPlan as StepPlan
from ._step import StepResult as StepResult
from ._step import check_grads as check_grads

__all__ = [
    "plan",
    "repeat_plan",
    "remember",
    "commit",
    "compute_step",
    "StepPlan",
    "StepResult",
    "Bucket",
    "check_grads",
    "StepDriver",
    "set_step_driver",
    "step_driver",
]
