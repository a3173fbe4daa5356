"""The differentiable twins: thin shells that run a pure `Rule` over the param groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ._base import DifferentiableOptimizer
from ._buckets import repeat_plan, rule_plan, store
from ._errors import ArgumentTypeError, HyperparameterTypeError, OptimError
from ._protocol import load_params
from ._rule import (
    BOOKKEEPING_KEYS,
    Rule,
    check_hyper,
    check_scalar,
    check_values,
)
from ._rules_adam import ADAM, ADAMW
from ._rules_adam_variants import ADAMAX, NADAM, RADAM, scalar_dtype
from ._rules_adaptive import ADADELTA, ADAGRAD, RMSPROP
from ._rules_other import ADAFACTOR, ASGD, RPROP
from ._rules_sgd import SGD
from ._shell import Cache
from ._step import Bucket, StepPlan


class UnsupportedOptionError(OptimError):
    """A torch optimizer was built with an option its differentiable twin does not honour.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> opt.param_groups[0]["stable"] = True  # an option the twin knows nothing of
        >>> try:
        ...     higher.optim.get_diff_optim(opt, [w])
        ... except higher.optim.UnsupportedOptionError as err:
        ...     print(str(err).split(" are ")[0])
        SGD option(s) ['stable']
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


class RuleOptimizer(DifferentiableOptimizer):
    """A differentiable twin defined by a pure `Rule`: each step runs `rule.update` once for
    the slots of a group that share a step count (the usual case: the whole group).

    Examples:
        >>> import torch, higher.optim
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.1), [w])
        >>> plan = internal.plan(diffopt, [w])  # what a step runs: the rule, once per bucket
        >>> plan.rule.name, plan.rule.hypers, len(plan.buckets)
        ('Adam', ('lr', 'eps', 'weight_decay'), 1)
    """

    rule: ClassVar[Rule]
    #: the layout of the last step's buckets (see `_buckets.runs`)
    _bucket_cache: Cache | None = None

    def _import_state(self, torch_state: Any, device: Any) -> dict[str, Any]:
        state = super()._import_state(torch_state, device)
        for name in self.rule.scalar_state:  # a number in some torch versions' state
            value = state.get(name)
            if value is not None and not isinstance(value, torch.Tensor):
                state[name] = torch.tensor(float(value), dtype=scalar_dtype())
        return state

    def _check_options(self, other: torch.optim.Optimizer) -> None:
        keys = set(other.defaults)
        for group in other.param_groups:
            keys |= set(group) - {"params"}
        unknown = sorted(keys - self.rule.options - BOOKKEEPING_KEYS)
        if unknown:
            raise UnsupportedOptionError(
                f"{type(other).__name__} option(s) {unknown} are not supported by "
                f"{type(self).__name__} (it honours {sorted(self.rule.options)}); "
                "upgrade higher or open an issue"
            )
        self._check_groups(self.param_groups)

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        for g, group in enumerate(groups):
            self._check_group(g, group, group["params"])

    def _check_group(self, g: int, group: dict[str, Any], params: Sequence[torch.Tensor]) -> None:
        """Check the options of param group `g` over its parameters `params`."""
        try:
            check_hyper(self.rule, group, params)
            if "eps" in self.rule.extra and "eps" in group:
                eps = group["eps"]
                if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
                    raise HyperparameterTypeError(
                        f"hyperparameter 'eps' must be a pair (eps1 or None, eps2), got {eps!r}"
                    )
                for value in eps if eps[0] is not None else eps[1:]:
                    check_scalar("eps", value)
                    check_values(self.rule, "eps", value, params, False)
        except HyperparameterTypeError as err:
            raise HyperparameterTypeError(f"param group {g}: {err}") from None

    def _uses_rule(self) -> bool:
        # a subclass that overrides `_update` runs it (the hand-written path), not the rule
        return type(self)._update is RuleOptimizer._update

    def _make_plan(
        self,
        params: list[torch.Tensor],
        live: list[list[bool]],
        options: list[dict[str, Any]],
        kwargs: dict[str, Any],
    ) -> StepPlan:
        if not self._uses_rule():
            return super()._make_plan(params, live, options, kwargs)
        if kwargs:
            raise ArgumentTypeError(
                f"{type(self).__name__}.step() got unexpected keyword arguments {sorted(kwargs)}"
            )
        return rule_plan(self, params, live, options)

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        """The 0.2.1 hook: step the groups' slots in place with the rule (what `step` does
        through the protocol, for code that calls `_update` itself)."""
        params = list(self._reference)
        grads: list[torch.Tensor | None] = [None] * len(params)
        for group, mapping, gs in zip(
            self.param_groups, self._group_to_param_list, grouped_grads, strict=True
        ):
            for j, i in enumerate(mapping):
                params[i], grads[i] = group["params"][j], gs[j]
        live = [[grad is not None for grad in gs] for gs in grouped_grads]
        plan = RuleOptimizer._make_plan(self, params, live, self.param_groups, kwargs)
        result = plan.update(params, grads)
        for bucket, new_state in zip(plan.buckets, result.states, strict=True):
            store(self, bucket, new_state)
        load_params(self, result.params)
        self._version += 1  # a plan made before this is stale

    def _store_state(self, bucket: Bucket, new_state: Any) -> None:
        if not self._uses_rule():  # a hand-written `_update`: one dict per slot
            super()._store_state(bucket, new_state)
        else:
            store(self, bucket, new_state)

    def _repeat_plan(self, plan: StepPlan) -> StepPlan | None:
        if not self._uses_rule():
            return None
        return repeat_plan(self, plan)


class DifferentiableSGD(RuleOptimizer):
    """Differentiable twin of `torch.optim.SGD` (momentum, dampening, nesterov, weight decay,
    maximize).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> diffopt = higher.optim.DifferentiableSGD(opt, [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = SGD


class DifferentiableAdam(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adam` (amsgrad, maximize, decoupled weight decay).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdam(torch.optim.Adam([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAM


class DifferentiableAdamW(RuleOptimizer):
    """Differentiable twin of `torch.optim.AdamW` (Adam with decoupled weight decay).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
        >>> round(higher.optim.DifferentiableAdamW(opt, [w]).step(w.sum(), [w])[0].item(), 6)
        0.9
    """

    rule = ADAMW


class DifferentiableAdagrad(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adagrad` (lr_decay, initial_accumulator_value, ...).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdagrad(torch.optim.Adagrad([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAGRAD


class DifferentiableAdadelta(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adadelta`.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdadelta(torch.optim.Adadelta([w]), [w])
        >>> diffopt.step(w.sum(), params=[w])[0].item() < 1
        True
    """

    rule = ADADELTA


class DifferentiableAdamax(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adamax`.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdamax(torch.optim.Adamax([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAMAX


class DifferentiableASGD(RuleOptimizer):
    """Differentiable twin of `torch.optim.ASGD` (lambd, alpha, t0; `ax` kept in the state).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableASGD(torch.optim.ASGD([w], lr=0.5), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 3)
        0.5
    """

    rule = ASGD


class DifferentiableRMSprop(RuleOptimizer):
    """Differentiable twin of `torch.optim.RMSprop` (alpha, eps, momentum, centered, ...).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableRMSprop(torch.optim.RMSprop([w], lr=0.01), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 4)
        0.9
    """

    rule = RMSPROP


class DifferentiableRprop(RuleOptimizer):
    """Differentiable twin of `torch.optim.Rprop` (etas, step_sizes).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableRprop(torch.optim.Rprop([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = RPROP


class DifferentiableNAdam(RuleOptimizer):
    """Differentiable twin of `torch.optim.NAdam` (momentum_decay, decoupled weight decay).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableNAdam(torch.optim.NAdam([w], lr=0.1), [w])
        >>> diffopt.step(w.sum(), params=[w])[0].item() < 1
        True
    """

    rule = NADAM


class DifferentiableRAdam(RuleOptimizer):
    """Differentiable twin of `torch.optim.RAdam` (decoupled weight decay where torch has it).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableRAdam(torch.optim.RAdam([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = RADAM


class DifferentiableAdafactor(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adafactor` (on a torch that has it, 2.5 and later).

    Where torch reads a norm back as a number, the twin keeps it a tensor, so its step is
    differentiable in the parameters as the mathematics says.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adafactor([w], lr=0.1)
        >>> new_w = higher.optim.DifferentiableAdafactor(opt, [w]).step(w.sum(), [w])
    """

    rule = ADAFACTOR
