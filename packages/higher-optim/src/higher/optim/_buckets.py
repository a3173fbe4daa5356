"""The one adapter between torch's per-slot state (`diffopt.state[g][i]`) and a rule's typed
state: which slots a step runs together (buckets), their typed state (as the last step left it
where the bucket is the same, else gathered from the slots' dicts), and a step's new typed
state kept for the next (`_state.GroupState`)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from ._rule import Rule, unfusable_options
from ._shell import RuleShell, Run
from ._state import GroupState
from ._step import Bucket, StepPlan


def rule_plan(
    opt: RuleShell,
    params: list[torch.Tensor],
    live: list[list[bool]],
    options: list[dict[str, Any]],
) -> StepPlan:
    """The plan of a step of `opt`'s rule over the slots flagged in `live`."""
    found, fresh = runs(opt, live, params, options)
    buckets = [
        Bucket(g, slots, indices, gather(opt, g, slots, fresh), hyper(options[g], slots))
        for g, slots, indices in found
    ]
    requires_grad = [p.requires_grad for p in params]
    rule = opt.rule
    return StepPlan(buckets, options, requires_grad, rule, None, rule.name, rule.sparse)


def repeat_plan(opt: RuleShell, plan: StepPlan) -> StepPlan | None:
    """The last step's `plan` with each bucket's current state, while its buckets still hold
    (the runs `runs` last found, each keeping one step count and the same state fields);
    None where they do not (plan the step anew)."""
    cached = opt._bucket_cache
    if cached is None:
        return None
    found, stateless = cached[1], cached[2]
    buckets = plan.buckets
    if len(found) != len(buckets):
        return None
    now = []
    for bucket, run in zip(buckets, found, strict=True):
        g, slots, indices, state, hyper = bucket
        if g != run[0] or slots != run[1] or indices != run[2]:
            return None
        held = _held_state(opt, run, stateless, state)
        if held is None:
            return None
        now.append(bucket if held is state else Bucket(g, slots, indices, held, hyper))
    # (the fields in order, as `_replace` would give them, at a fraction of its cost)
    return StepPlan(now, *plan[1:-1], opt._version)


def _held_state(opt: RuleShell, run: Run, stateless: bool, last: Any) -> Any:
    """The rule's state of `run`'s slots (`gather` with no fresh state) where they still share
    one step count and the same state fields (`_buckets_hold`), else None; one look at a
    `GroupState` for both. `last`: the bucket's state in the last step, reused where it is
    still what gather gives (every field None)."""
    g, slots, _ = run
    states = opt.state[g]
    if isinstance(states, GroupState):
        kept = states.typed(slots)
        if kept is not None:
            return kept if _one_step_count(states, slots) else None
        if states.empty(slots):  # no state (again: it may have been cleared by hand)
            if not stateless:
                return None  # fresh
            return last if _none(last) else _no_state(opt.rule)
    if not _buckets_hold(opt, [run], stateless):
        return None
    return gather(opt, g, slots, {})


def _none(state: Any) -> bool:
    """Whether every field of a rule's state is None (no state)."""
    return not any(map(operator.is_not, state, itertools.repeat(None)))


def _no_state(rule: Rule) -> Any:
    """The rule's state of slots that have none: every field None."""
    return rule.state_type(*[None] * len(rule.state_type._fields))


def _one_step_count(states: GroupState, slots: tuple[int, ...]) -> bool:
    """Whether the slots of a bucket whose typed state is kept show the same fields (one
    step count: the bucket's)."""
    return len({len(states._dicts[j]) for j in slots}) == 1


def runs(
    opt: RuleShell,
    live: list[list[bool]],
    params: list[torch.Tensor],
    options: list[dict[str, Any]],
) -> tuple[list[Run], dict[tuple[int, int], dict[str, Any]]]:
    """`(group, slots, indices)` for each run of `rule.update` a step makes: the slots
    flagged in `live` of a group, split by step count, dtype, device and state present;
    and the initial state of the slots that have none yet, where the rule's `init` gives them
    any (kept until `commit`). Slots where no state is held or given (SGD without momentum)
    are split by dtype and device alone.

    The slots of a bucket are stepped together, so they keep one step count and the same
    state fields: the last step's runs are reused while that still holds for the same
    `live` (a step on other slots, or state set by hand, makes them computed again). A group
    with a hyperparameter of one value per element (or of more dimensions than one) runs
    once per slot: the rule's kernel then sees one parameter at a time, which such a value
    broadcasts to."""
    rule = opt.rule
    split = [bool(unfusable_options(rule, group)) for group in options]
    for g, mapping in enumerate(opt._group_to_param_list):
        if split[g]:  # values set in param_groups by hand are checked here
            opt._check_group(g, options[g], [params[i] for i in mapping])
    key = (live, split)
    cached = opt._bucket_cache
    if cached is not None and cached[0] == key and _buckets_hold(opt, *cached[1:]):
        return cached[1], {}
    out: list[Run] = []
    fresh: dict[tuple[int, int], dict[str, Any]] = {}
    fields = [f for f in rule.state_type._fields if f != "step" and f not in rule.scalar_state]
    stateless = True  # no slot stepped has state, held or initial
    for g, (flags, mapping) in enumerate(zip(live, opt._group_to_param_list, strict=True)):
        states = opt.state[g]
        held = states._dicts if isinstance(states, GroupState) else states  # (no view per slot)
        slots = [j for j, flag in enumerate(flags) if flag]
        new = [j for j in slots if not held.get(j)]
        none = len(new) == len(slots)  # no slot holds state
        if new:
            values = fresh_states(rule, [params[mapping[j]] for j in new], options[g], new)
            # (an empty initial state is no state: gather reads the slot's, which is empty)
            fresh.update(((g, j), state) for j, state in zip(new, values, strict=True) if state)
            none = none and not any(values)
        stateless = stateless and none
        if len(slots) <= 1 or split[g]:  # one slot is one bucket: no keys to compute
            out.extend((g, (j,), (mapping[j],)) for j in slots)
            continue
        buckets: dict[tuple[Any, ...], list[int]] = {}
        if none and not rule.scalar_state:  # every key but dtype and device is the same
            for j in slots:
                p = params[mapping[j]]
                buckets.setdefault((p.dtype, p.device), []).append(j)
        else:
            for j in slots:
                state = fresh.get((g, j)) or states.get(j, {})
                shared = _bucket_key(state, rule, fields, params[mapping[j]])
                buckets.setdefault(shared, []).append(j)
        out.extend((g, tuple(b), tuple(mapping[j] for j in b)) for b in buckets.values())
    # (stateless: a rule that keeps no state for these options, SGD without momentum: its
    # empty state is not fresh)
    opt._bucket_cache = (([list(flags) for flags in live], split), out, stateless)
    return out, fresh


def _bucket_key(
    state: dict[str, Any], rule: Rule, fields: list[str], p: torch.Tensor
) -> tuple[Any, ...]:
    """What the slots of one bucket share: step count, dtype, device, the per-tensor `fields`
    of the state present, the scalar state's values."""
    present = tuple(state.get(f) is not None for f in fields)
    scalars = tuple(float(state[f].detach()) for f in rule.scalar_state)
    return (state.get("step"), p.dtype, p.device, present, scalars)


def _buckets_hold(opt: RuleShell, found: list[Run], stateless: bool) -> bool:
    """Whether each run's slots still share one step count and the same state fields."""
    for g, slots, _ in found:
        states = opt.state[g]
        if isinstance(states, GroupState) and states.typed(slots) is not None:
            if _one_step_count(states, slots):
                continue
            return False
        if _empty(states, slots):
            if stateless:  # a rule that keeps no state
                continue
            return False  # fresh
        first = states.get(slots[0])
        if not first:  # some slots fresh, others not
            return False
        step, size = first.get("step"), len(first)
        for j in slots:
            state = states.get(j)
            if not state or state.get("step") != step or len(state) != size:
                return False
    return True


def _empty(states: MutableMapping[int, Any], slots: Sequence[int]) -> bool:
    """Whether none of `slots` has any state (a `GroupState` answers without a view per slot;
    a plain dict is one set by hand)."""
    if isinstance(states, GroupState):
        return states.empty(slots)
    return not any(states.get(j) for j in slots)


def fresh_states(
    rule: Rule, params: list[torch.Tensor], group: dict[str, Any], slots: list[int]
) -> list[dict[str, Any]]:
    """The initial state of `slots` of a group (one `rule.init` call for all of them), for
    `params`, their current values."""
    init = rule.init(params, hyper(group, slots))
    states: list[dict[str, Any]] = [{} for _ in slots]
    for name, value in zip(init._fields, init, strict=True):
        for k, state in enumerate(states):
            if name == "step" or name in rule.scalar_state:
                state[name] = value
            elif value is not None and value[k] is not None:
                state[name] = value[k]
    return states


def gather(
    opt: RuleShell,
    g: int,
    slots: tuple[int, ...],
    fresh: dict[tuple[int, int], dict[str, Any]],
) -> Any:
    """The rule's state of `slots` of group `g` (the initial state where `fresh` has it)."""
    rule, states = opt.rule, opt.state[g]
    if isinstance(states, GroupState) and not any((g, j) in fresh for j in slots):
        kept = states.typed(slots)  # the bucket's state as the last step left it
        if kept is not None:
            return kept
        if _empty(states, slots):  # a rule that keeps no state for these options (SGD)
            return _no_state(rule)
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


def store(opt: RuleShell, bucket: Bucket, new_state: Any) -> None:
    """Keep what `rule.update` returned for a bucket (typed, in a `GroupState`; into the slots'
    dicts where the state was set to plain dicts by hand)."""
    if _none(new_state):  # a rule without state (SGD)
        return
    rule = opt.rule
    states: MutableMapping[int, Any] = opt.state[bucket.group]  # a plain dict if set by hand
    if isinstance(states, GroupState):
        shared = frozenset(n for n in new_state._fields if n == "step" or n in rule.scalar_state)
        states.store(bucket.slots, new_state, shared, rule.state_type)
        return
    for k, j in enumerate(bucket.slots):
        slot = states[j]
        for name, value in zip(new_state._fields, new_state, strict=True):
            if name == "step" or name in rule.scalar_state:
                slot[name] = value
            elif value is not None and value[k] is not None:
                slot[name] = value[k]


def hyper(group: dict[str, Any], slots: Sequence[int]) -> dict[str, Any]:
    """A group's options for a run over `slots` (`params` left out, a per-parameter `lr`
    narrowed to the slots)."""
    out = {k: v for k, v in group.items() if k != "params"}
    lr = out.get("lr")
    if isinstance(lr, (list, tuple)):
        out["lr"] = [lr[j] for j in slots]
    return out
