"""The differentiable twins: thin shells that run a pure `Rule` over the param groups."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ._base import DifferentiableOptimizer
from ._errors import HyperparameterTypeError, OptimError
from ._rule import Rule, check_hyper, check_scalar
from ._rules_adam import ADAM, ADAMW
from ._rules_adam_variants import ADAMAX, NADAM, RADAM, scalar_dtype
from ._rules_adaptive import ADADELTA, ADAGRAD, RMSPROP
from ._rules_other import ADAFACTOR, ASGD, RPROP
from ._rules_sgd import SGD


class UnsupportedOptionError(OptimError):
    """A torch optimizer was built with an option its differentiable twin does not honour.

    Example:
        >>> import higher.optim
        >>> issubclass(higher.optim.UnsupportedOptionError, ValueError)
        True
    """


def _bucket_key(state: dict[str, Any], rule: Rule, p: torch.Tensor) -> tuple[Any, ...]:
    fields = [f for f in rule.state_type._fields if f != "step" and f not in rule.scalar_state]
    present = tuple(state.get(f) is not None for f in fields)
    scalars = tuple(float(state[f].detach()) for f in rule.scalar_state)
    return (state.get("step"), p.dtype, p.device, present, scalars)


class RuleOptimizer(DifferentiableOptimizer):
    """A differentiable twin defined by a pure `Rule`: each step runs `rule.update` once for
    the slots of a group that share a step count (the usual case: the whole group).

    Example:
        >>> import higher.optim
        >>> higher.optim.DifferentiableAdam.rule.name, issubclass(
        ...     higher.optim.DifferentiableAdam, higher.optim.RuleOptimizer)
        ('Adam', True)
    """

    rule: ClassVar[Rule]
    #: the last `_buckets` call: its `live` key, its buckets, and whether their state was empty
    _bucket_cache: tuple[tuple[tuple[bool, ...], ...], list[tuple[int, list[int]]], bool] | None = (
        None
    )

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
            keys |= {k for k in group if k in other.defaults}
        unknown = sorted(keys - self.rule.options)
        if unknown:
            raise UnsupportedOptionError(
                f"{type(other).__name__} option(s) {unknown} are not supported by "
                f"{type(self).__name__} (it honours {sorted(self.rule.options)}); "
                "upgrade higher or open an issue"
            )
        self._check_groups()

    def _check_groups(self) -> None:
        for g, group in enumerate(self.param_groups):
            try:
                check_hyper(self.rule, group, len(group["params"]))
                if "eps" in self.rule.extra and "eps" in group:
                    eps = group["eps"]
                    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
                        raise HyperparameterTypeError(
                            f"hyperparameter 'eps' must be a pair (eps1 or None, eps2), got {eps!r}"
                        )
                    if eps[0] is not None:
                        check_scalar("eps", eps[0])
                    check_scalar("eps", eps[1])
            except HyperparameterTypeError as err:
                raise HyperparameterTypeError(f"param group {g}: {err}") from None

    def _fresh_states(self, group: dict[str, Any], slots: list[int]) -> list[dict[str, Any]]:
        """The initial state of `slots` (one `rule.init` call for all of them)."""
        hyper = group
        if isinstance(group.get("lr"), (list, tuple)):
            hyper = {**group, "lr": [group["lr"][j] for j in slots]}
        init = self.rule.init([group["params"][j] for j in slots], hyper)
        states: list[dict[str, Any]] = [{} for _ in slots]
        for name, value in zip(init._fields, init, strict=True):
            for k, state in enumerate(states):
                if name == "step" or name in self.rule.scalar_state:
                    state[name] = value
                elif value is not None and value[k] is not None:
                    state[name] = value[k]
        return states

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        if kwargs:
            raise HyperparameterTypeError(
                f"{type(self).__name__}.step() got unexpected keyword arguments {sorted(kwargs)}"
            )
        for g, slots in self._buckets([[grad is not None for grad in gs] for gs in grouped_grads]):
            group = self.param_groups[g]
            grads = grouped_grads[g]
            state, hyper = self._gather(g, slots, keep_params=True)
            new_params, new_state = self.rule.update(
                [group["params"][j] for j in slots],
                [grads[j] for j in slots],  # type: ignore[misc]
                state,
                hyper,
            )
            self._scatter(g, slots, new_params, new_state)

    def _buckets(self, live: list[list[bool]]) -> list[tuple[int, list[int]]]:
        """`(group, slots)` for each run of `rule.update` a step makes: the slots flagged in
        `live` of a group, split by step count, dtype, device and state present. Slots without
        state get their initial state first.

        The slots of a bucket are stepped together, so they keep one step count and the same
        state fields: the last step's buckets are reused while that still holds for the same
        `live` (a step on other slots, or state set by hand, makes them computed again)."""
        key = tuple(map(tuple, live))
        cached = self._bucket_cache
        if cached is not None and cached[0] == key and self._buckets_hold(*cached[1:]):
            return cached[1]
        rule = self.rule
        out: list[tuple[int, list[int]]] = []
        for g, (group, flags) in enumerate(zip(self.param_groups, live, strict=True)):
            params: list[torch.Tensor] = group["params"]
            states = self.state[g]
            slots = [j for j, flag in enumerate(flags) if flag]
            fresh = [j for j in slots if not states.get(j)]
            if fresh:
                for j, state in zip(fresh, self._fresh_states(group, fresh), strict=True):
                    states[j] = state
            if len(slots) <= 1:  # one slot is one bucket: no keys to compute
                out.extend((g, [j]) for j in slots)
                continue
            buckets: dict[tuple[Any, ...], list[int]] = {}
            for j in slots:
                buckets.setdefault(_bucket_key(states[j], rule, params[j]), []).append(j)
            out.extend((g, bucket) for bucket in buckets.values())
        # a rule that keeps no state for these options (SGD without momentum): empty is not fresh
        stateless = not any(self.state[g].get(j) for g, slots in out for j in slots)
        self._bucket_cache = (key, out, stateless)
        return out

    def _buckets_hold(self, buckets: list[tuple[int, list[int]]], stateless: bool) -> bool:
        """Whether each bucket's slots still share one step count and the same state fields."""
        for g, slots in buckets:
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
        self, g: int, slots: list[int], keep_params: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """The rule's state of `slots` of group `g`, and the group's options (`lr` narrowed
        to `slots` where it is a list; the group itself, `params` and all, where that leaves
        it unchanged and `keep_params`)."""
        rule, group, states = self.rule, self.param_groups[g], self.state[g]
        first = states[slots[0]]
        values: dict[str, Any] = {}
        for name in rule.state_type._fields:
            if name == "step" or name in rule.scalar_state:
                values[name] = first[name]
            else:
                column = [states[j].get(name) for j in slots]
                values[name] = None if all(v is None for v in column) else column
        per_param = isinstance(group.get("lr"), (list, tuple))
        if keep_params and not per_param:
            return rule.state_type(**values), group
        hyper = {k: v for k, v in group.items() if k != "params"}
        if per_param:
            hyper["lr"] = [hyper["lr"][j] for j in slots]
        return rule.state_type(**values), hyper

    def _scatter(
        self, g: int, slots: list[int], new_params: list[torch.Tensor], new_state: Any
    ) -> None:
        """Store what `rule.update` returned for `slots` of group `g`."""
        rule, params, states = self.rule, self.param_groups[g]["params"], self.state[g]
        for k, j in enumerate(slots):
            params[j] = new_params[k]
            slot = states[j]
            for name, value in zip(new_state._fields, new_state, strict=True):
                if name == "step" or name in rule.scalar_state:
                    slot[name] = value
                elif value is not None and value[k] is not None:
                    slot[name] = value[k]


class DifferentiableSGD(RuleOptimizer):
    """Differentiable twin of `torch.optim.SGD` (momentum, dampening, nesterov, weight decay,
    maximize).

    Example:
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

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdam(torch.optim.Adam([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAM


class DifferentiableAdamW(RuleOptimizer):
    """Differentiable twin of `torch.optim.AdamW` (Adam with decoupled weight decay).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
        >>> round(higher.optim.DifferentiableAdamW(opt, [w]).step(w.sum(), [w])[0].item(), 6)
        0.9
    """

    rule = ADAMW


class DifferentiableAdagrad(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adagrad` (lr_decay, initial_accumulator_value, ...).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdagrad(torch.optim.Adagrad([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAGRAD


class DifferentiableAdadelta(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adadelta`.

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdadelta(torch.optim.Adadelta([w]), [w])
        >>> diffopt.step(w.sum(), params=[w])[0].item() < 1
        True
    """

    rule = ADADELTA


class DifferentiableAdamax(RuleOptimizer):
    """Differentiable twin of `torch.optim.Adamax`.

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableAdamax(torch.optim.Adamax([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = ADAMAX


class DifferentiableASGD(RuleOptimizer):
    """Differentiable twin of `torch.optim.ASGD` (lambd, alpha, t0; `ax` kept in the state).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableASGD(torch.optim.ASGD([w], lr=0.5), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 3)
        0.5
    """

    rule = ASGD


class DifferentiableRMSprop(RuleOptimizer):
    """Differentiable twin of `torch.optim.RMSprop` (alpha, eps, momentum, centered, ...).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableRMSprop(torch.optim.RMSprop([w], lr=0.01), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 4)
        0.9
    """

    rule = RMSPROP


class DifferentiableRprop(RuleOptimizer):
    """Differentiable twin of `torch.optim.Rprop` (etas, step_sizes).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableRprop(torch.optim.Rprop([w], lr=0.1), [w])
        >>> round(diffopt.step(w.sum(), params=[w])[0].item(), 6)
        0.9
    """

    rule = RPROP


class DifferentiableNAdam(RuleOptimizer):
    """Differentiable twin of `torch.optim.NAdam` (momentum_decay, decoupled weight decay).

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.DifferentiableNAdam(torch.optim.NAdam([w], lr=0.1), [w])
        >>> diffopt.step(w.sum(), params=[w])[0].item() < 1
        True
    """

    rule = NADAM


class DifferentiableRAdam(RuleOptimizer):
    """Differentiable twin of `torch.optim.RAdam` (decoupled weight decay where torch has it).

    Example:
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

    Example:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adafactor([w], lr=0.1)
        >>> new_w = higher.optim.DifferentiableAdafactor(opt, [w]).step(w.sum(), [w])
    """

    rule = ADAFACTOR
