"""The differentiable twins: thin shells that run a pure `Rule` over the param groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ._base import DifferentiableOptimizer
from ._errors import ArgumentTypeError, HyperparameterTypeError, OptimError
from ._rule import (
    BOOKKEEPING_KEYS,
    Rule,
    check_hyper,
    check_scalar,
    check_values,
    unfusable_options,
)
from ._rules_adam import ADAM, ADAMW
from ._rules_adam_variants import ADAMAX, NADAM, RADAM, scalar_dtype
from ._rules_adaptive import ADADELTA, ADAGRAD, RMSPROP
from ._rules_other import ADAFACTOR, ASGD, RPROP
from ._rules_sgd import SGD
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


#: (group, slots, positions of the slots among the step's parameters): one run of the rule
_Run = tuple[int, tuple[int, ...], tuple[int, ...]]


def _bucket_key(state: dict[str, Any], rule: Rule, p: torch.Tensor) -> tuple[Any, ...]:
    fields = [f for f in rule.state_type._fields if f != "step" and f not in rule.scalar_state]
    present = tuple(state.get(f) is not None for f in fields)
    scalars = tuple(float(state[f].detach()) for f in rule.scalar_state)
    return (state.get("step"), p.dtype, p.device, present, scalars)


class RuleOptimizer(DifferentiableOptimizer):
    """A differentiable twin defined by a pure `Rule`: each step runs `rule.update` once for
    the slots of a group that share a step count (the usual case: the whole group).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.1), [w])
        >>> plan = diffopt.plan([w])  # what the step will run: the rule, once per bucket
        >>> plan.rule.name, plan.rule.hypers, len(plan.buckets)
        ('Adam', ('lr', 'eps', 'weight_decay'), 1)
    """

    rule: ClassVar[Rule]
    #: the last `_runs` call: its `live` key, its runs, and whether their state was empty
    _bucket_cache: tuple[tuple[list[list[bool]], list[bool]], list[_Run], bool] | None = None

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
        runs, fresh = self._runs(live, params, options)
        buckets = [
            Bucket(g, slots, indices, self._gather(g, slots, fresh), _hyper(options[g], slots))
            for g, slots, indices in runs
        ]
        requires_grad = [p.requires_grad for p in params]
        rule = self.rule
        return StepPlan(buckets, options, requires_grad, rule, None, rule.name, rule.sparse)

    def _fresh_states(
        self, params: list[torch.Tensor], group: dict[str, Any], slots: list[int]
    ) -> list[dict[str, Any]]:
        """The initial state of `slots` of a group (one `rule.init` call for all of them), for
        `params`, their current values."""
        init = self.rule.init(params, _hyper(group, slots))
        states: list[dict[str, Any]] = [{} for _ in slots]
        for name, value in zip(init._fields, init, strict=True):
            for k, state in enumerate(states):
                if name == "step" or name in self.rule.scalar_state:
                    state[name] = value
                elif value is not None and value[k] is not None:
                    state[name] = value[k]
        return states

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
            self._store_state(bucket, new_state)
        self._load_params(result.params)

    def _runs(
        self, live: list[list[bool]], params: list[torch.Tensor], options: list[dict[str, Any]]
    ) -> tuple[list[_Run], dict[tuple[int, int], dict[str, Any]]]:
        """`(group, slots, indices)` for each run of `rule.update` a step makes: the slots
        flagged in `live` of a group, split by step count, dtype, device and state present;
        and the initial state of the slots that have none yet (kept until `commit`).

        The slots of a bucket are stepped together, so they keep one step count and the same
        state fields: the last step's runs are reused while that still holds for the same
        `live` (a step on other slots, or state set by hand, makes them computed again). A group
        with a hyperparameter of one value per element (or of more dimensions than one) runs
        once per slot: the rule's kernel then sees one parameter at a time, which such a value
        broadcasts to."""
        rule = self.rule
        split = [bool(unfusable_options(rule, group)) for group in options]
        for g, mapping in enumerate(self._group_to_param_list):
            if split[g]:  # values set in param_groups by hand are checked here
                self._check_group(g, options[g], [params[i] for i in mapping])
        key = (live, split)
        cached = self._bucket_cache
        if cached is not None and cached[0] == key and self._buckets_hold(*cached[1:]):
            return cached[1], {}
        out: list[_Run] = []
        fresh: dict[tuple[int, int], dict[str, Any]] = {}
        for g, (flags, mapping) in enumerate(zip(live, self._group_to_param_list, strict=True)):
            states = self.state[g]
            slots = [j for j, flag in enumerate(flags) if flag]
            new = [j for j in slots if not states.get(j)]
            if new:
                values = self._fresh_states([params[mapping[j]] for j in new], options[g], new)
                fresh.update(((g, j), state) for j, state in zip(new, values, strict=True))
            if len(slots) <= 1 or split[g]:  # one slot is one bucket: no keys to compute
                out.extend((g, (j,), (mapping[j],)) for j in slots)
                continue
            buckets: dict[tuple[Any, ...], list[int]] = {}
            for j in slots:
                state = fresh.get((g, j)) or states.get(j, {})
                buckets.setdefault(_bucket_key(state, rule, params[mapping[j]]), []).append(j)
            out.extend((g, tuple(b), tuple(mapping[j] for j in b)) for b in buckets.values())
        # a rule that keeps no state for these options (SGD without momentum): empty is not fresh
        stateless = not any(
            fresh.get((g, j)) or self.state[g].get(j) for g, ss, _ in out for j in ss
        )
        self._bucket_cache = (([list(flags) for flags in live], split), out, stateless)
        return out, fresh

    def _buckets_hold(self, runs: list[_Run], stateless: bool) -> bool:
        """Whether each run's slots still share one step count and the same state fields."""
        for g, slots, _ in runs:
            states = self.state[g]
            first = states.get(slots[0])
            if not first:  # fresh, or a rule that keeps no state
                if stateless and not any(states.get(j) for j in slots):
                    continue
                return False
            step, size = first.get("step"), len(first)
            for j in slots:
                state = states.get(j)
                if not state or state.get("step") != step or len(state) != size:
                    return False
        return True

    def _gather(
        self, g: int, slots: tuple[int, ...], fresh: dict[tuple[int, int], dict[str, Any]]
    ) -> Any:
        """The rule's state of `slots` of group `g` (the initial state where `fresh` has it)."""
        rule, states = self.rule, self.state[g]
        empty: dict[str, Any] = {}
        slot_states = [fresh.get((g, j)) or states.get(j) or empty for j in slots]
        values: dict[str, Any] = {}
        for name in rule.state_type._fields:
            if name == "step" or name in rule.scalar_state:
                values[name] = slot_states[0][name]
            else:
                column = [state.get(name) for state in slot_states]
                values[name] = None if all(v is None for v in column) else column
        return rule.state_type(**values)

    def _store_state(self, bucket: Bucket, new_state: Any) -> None:
        """Store what `rule.update` returned for a bucket into the slots' state dicts."""
        if not any(value is not None for value in new_state):  # a rule without state (SGD)
            return
        rule, states = self.rule, self.state[bucket.group]
        for k, j in enumerate(bucket.slots):
            slot = states[j]
            for name, value in zip(new_state._fields, new_state, strict=True):
                if name == "step" or name in rule.scalar_state:
                    slot[name] = value
                elif value is not None and value[k] is not None:
                    slot[name] = value[k]


def _hyper(group: dict[str, Any], slots: Sequence[int]) -> dict[str, Any]:
    """A group's options for a run over `slots` (`params` left out, a per-parameter `lr`
    narrowed to the slots)."""
    hyper = {k: v for k, v in group.items() if k != "params"}
    lr = hyper.get("lr")
    if isinstance(lr, (list, tuple)):
        hyper["lr"] = [lr[j] for j in slots]
    return hyper


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
