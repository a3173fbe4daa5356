"""The step protocol's values: `Bucket`, `StepPlan` (with its pure `update`), `StepResult`.

Public through `higher.optim.internal`, which says what the protocol guarantees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._errors import OptimError
from ._rule import Rule


class Bucket(NamedTuple):
    """One run of the update rule in a step: slots of one param group stepped together.

    `indices` are the positions of these slots in the step's parameter list (the order of
    `reference_params`); `state` is what the rule updates (for a `Rule`, its typed state over
    these slots; for a hand-written `_update`, one dict per slot); `hyper` the group's options
    as this step uses them (a per-parameter `lr` narrowed to these slots).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> bucket = internal.plan(diffopt, [w]).buckets[0]
        >>> bucket.group, bucket.slots, bucket.indices, bucket.hyper["lr"]
        (0, (0,), (0,), 0.5)
    """

    group: int
    slots: tuple[int, ...]
    indices: tuple[int, ...]
    state: Any
    hyper: Mapping[str, Any]


class StepResult(NamedTuple):
    """What `StepPlan.update` returns: the new parameters (every one, in the order of
    `reference_params`; those not stepped are the inputs themselves) and each bucket's new state.

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> result = internal.plan(diffopt, [w]).update([w], [torch.ones(2)])
        >>> result.params[0].tolist(), len(result.states)
        ([0.5, 0.5], 1)
    """

    params: list[torch.Tensor]
    states: list[Any]


def check_grads(
    buckets: Sequence[Bucket],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    sparse_ok: bool,
    name: str,
) -> list[torch.Tensor | None]:
    """`grads` checked against the stepped parameters: a tensor of the parameter's shape for
    each; sparse ones made dense where the optimizer takes them (torch's sparse path computes
    the same values: rows without a gradient do not move), else refused as torch refuses them.

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
        >>> plan = internal.plan(diffopt, [w])
        >>> internal.check_grads(plan.buckets, [w], [torch.ones(3)], False, "SGD")
        Traceback (most recent call last):
        ...
        higher.optim.OptimError: gradient 0 has shape (3,); expected (2,), the shape of ...
    """
    if len(grads) != len(params):
        raise OptimError(
            f"got {len(grads)} gradients for {len(params)} parameters; expected one per "
            "parameter (None where there is none)"
        )
    out = grads if isinstance(grads, list) else list(grads)
    for bucket in buckets:
        for i in bucket.indices:
            g, p = out[i], params[i]
            if not isinstance(g, torch.Tensor):
                raise OptimError(
                    f"gradient {i} is {type(g).__name__}; parameter {i} is stepped, so it needs "
                    f"a tensor of shape {tuple(p.shape)} (a grad_callback must return one per "
                    "parameter that has one)"
                )
            if g.shape != p.shape:
                raise OptimError(
                    f"gradient {i} has shape {tuple(g.shape)}; expected {tuple(p.shape)}, the "
                    f"shape of parameter {i} (a grad_callback must keep each gradient's shape)"
                )
            if g.layout != torch.strided:
                if not sparse_ok:
                    raise OptimError(
                        f"{name} does not support sparse gradients (gradient {i} is sparse), as "
                        f"torch.optim.{name} does not; use an optimizer that does (SGD, "
                        "Adagrad) or a dense embedding"
                    )
                decay = bucket.hyper.get("weight_decay", 0)
                if isinstance(decay, torch.Tensor) or decay != 0:
                    raise OptimError(
                        f"{name}: the weight_decay option is not compatible with sparse "
                        f"gradients (gradient {i} is sparse), as in torch.optim.{name}"
                    )
                out = list(out) if out is grads else out
                out[i] = g.to_dense()
    return out


class StepPlan(NamedTuple):
    """What one step will do, checked and gathered by `higher.optim.internal.plan`.

    `update(params, grads)` runs it as a pure function (nothing is modified: call it again, in a
    traced graph, under `vmap` or during a backward pass, and it computes the same);
    `higher.optim.internal.commit(diffopt, plan, result)` stores the outcome. A plan is for one
    step of the optimizer that made it, at the state it made it from: make it, run it, commit it
    (once).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.1), [w])
        >>> plan = internal.plan(diffopt, [w])
        >>> result = plan.update([w], [torch.ones(2)])
        >>> new = internal.commit(diffopt, plan, result)
        >>> [round(v, 6) for v in new[0].tolist()], result.states[0].step
        ([0.9, 0.9], 1)
    """

    #: one run of the rule per bucket
    buckets: list[Bucket]
    #: per param group, the options this step uses (an `override` of the step applied)
    options: list[dict[str, Any]]
    #: per parameter, whether it requires grad (a first-order commit keeps the flag)
    requires_grad: list[bool]
    #: the update rule (None for an optimizer with a hand-written `_update`)
    rule: Rule | None
    #: runs a hand-written `_update` on copies (None for a rule)
    fallback: (
        Callable[
            [StepPlan, Sequence[torch.Tensor], list[torch.Tensor | None], list[Any]], StepResult
        ]
        | None
    )
    #: the optimizer's name, for messages
    name: str
    #: whether sparse gradients are taken (made dense, as torch's sparse path computes)
    sparse_ok: bool = False
    #: the optimizer that made the plan (its identity token; None: not bound yet)
    owner: object = None
    #: that optimizer's state version when the plan was made (each commit makes a new one)
    version: int = -1

    def update(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        states: Sequence[Any] | None = None,
    ) -> StepResult:
        """Run the step on `params` and `grads` (in the order of `reference_params`; None where
        a parameter has no gradient): a pure function. `states` replaces the buckets' states
        (default: as planned).

        Examples:
            >>> import torch, higher.optim
            >>> from higher.optim import internal
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
            >>> plan = internal.plan(diffopt, [w])
            >>> plan.update([w], [torch.ones(1)]).params[0].item()
            0.5
        """
        checked = check_grads(self.buckets, params, grads, self.sparse_ok, self.name)
        return self.run(params, checked, states)

    def run(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        states: Sequence[Any] | None = None,
    ) -> StepResult:
        """`update` for gradients known to be right: a dense tensor shaped like its parameter
        for each stepped one (autograd's, for instance); nothing about them is checked.

        Examples:
            >>> import torch, higher.optim
            >>> from higher.optim import internal
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.5), [w])
            >>> plan = internal.plan(diffopt, [w])
            >>> plan.run([w], [torch.ones(1)]).params[0].item()
            0.5
        """
        states = [b.state for b in self.buckets] if states is None else list(states)
        if self.fallback is not None:
            return self.fallback(self, params, list(grads), states)
        assert self.rule is not None
        new_params = list(params)
        new_states = []
        for bucket, state in zip(self.buckets, states, strict=True):
            out, new_state = self.rule.update(
                [params[i] for i in bucket.indices],
                [grads[i] for i in bucket.indices],  # type: ignore[misc]
                state,
                bucket.hyper,
            )
            for i, q in zip(bucket.indices, out, strict=True):
                new_params[i] = q
            new_states.append(new_state)
        return StepResult(new_params, new_states)
