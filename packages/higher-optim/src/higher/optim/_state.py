"""A param group's optimizer state: typed per bucket between steps, seen per slot.

After a step of a `Rule` twin, each bucket's new state (the rule's typed state over the
bucket's slots) is kept as it is: the next step over the same bucket takes it back without
gathering it from per-slot dicts. `diffopt.state[g]` (a `GroupState`) and
`diffopt.state[g][i]` (a `SlotState`) show it in torch's per-parameter format, read through,
so a reference held across steps reads the current values. A slot written through the view
(or a bucket laid out differently) has its typed state turned back into its dict first: the
step then gathers from the dicts as it always did, so the values are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree


class _Typed:
    """The value of a slot's dict entry that a typed bucket state holds (a placeholder that
    keeps the entry's place in the dict's order)."""

    def __repr__(self) -> str:
        return "<typed>"

    def __reduce__(self) -> str:
        return "TYPED"  # the module's one instance, through copies and pickles


TYPED = _Typed()


class _Record:
    """One bucket's state as the rule returned it: its slots and the rule's typed state."""

    __slots__ = ("shared", "slots", "state", "uniform")

    def __init__(
        self,
        slots: tuple[int, ...],
        state: NamedTuple,
        shared: frozenset[str],
        uniform: frozenset[str] | None,
    ) -> None:
        self.slots, self.state, self.shared = slots, state, shared
        #: the fields every slot shows, where each shows the same ones and its dict holds no
        #: other of the state's fields (None: the slots differ)
        self.uniform = uniform

    def read(self, k: int, name: str) -> Any:
        """The value of field `name` for the bucket's `k`-th slot."""
        value = getattr(self.state, name)
        return value if name in self.shared else value[k]


class SlotState(MutableMapping[str, Any]):
    """`diffopt.state[g][i]`: one slot's state in torch's format (a live view).

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.Adam([w], lr=0.1), [w])
        >>> _ = diffopt.step(w.sum(), params=[w])
        >>> slot = diffopt.state[0][0]
        >>> _ = diffopt.step(w.sum(), params=[w])
        >>> slot["step"], sorted(slot)
        (2, ['exp_avg', 'exp_avg_sq', 'step'])
    """

    __slots__ = ("_group", "_slot")

    def __init__(self, group: GroupState, slot: int) -> None:
        self._group, self._slot = group, slot

    def __getitem__(self, name: str) -> Any:
        return self._group._read(self._slot, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._group._writable(self._slot)[name] = value

    def __delitem__(self, name: str) -> None:
        del self._group._writable(self._slot)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._group._dicts.get(self._slot, ())))

    def __len__(self) -> int:
        return len(self._group._dicts.get(self._slot, ()))

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __copy__(self) -> dict[str, Any]:
        return dict(self.items())


class GroupState(MutableMapping[int, SlotState]):
    """`diffopt.state[g]`: slot -> its state (a `SlotState`); as torch's `defaultdict(dict)`,
    reading a slot without state gives an empty one.

    Examples:
        >>> import torch, higher.optim
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1, momentum=0.9), [w])
        >>> _ = diffopt.step(w.sum(), params=[w])
        >>> diffopt.state[0][0]["momentum_buffer"] = torch.zeros(2)  # used by the next step
        >>> [round(v, 6) for v in diffopt.step(w.sum(), params=[w])[0].tolist()]
        [0.9, 0.9]
    """

    def __init__(self, slots: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        #: per slot, its dict; an entry a typed bucket state holds has the value `TYPED`
        self._dicts: dict[int, dict[str, Any]] = {}
        #: per slot held by a typed bucket state: that state and the slot's place in it
        self._typed: dict[int, tuple[_Record, int]] = {}
        for j, slot in (slots or {}).items():
            self[j] = slot

    # -- the mapping ---------------------------------------------------------------------------

    def __getitem__(self, j: int) -> SlotState:
        if j not in self._dicts:
            self._dicts[j] = {}
        return SlotState(self, j)  # not kept: no reference cycle, freed by reference counting

    def get(self, j: int, default: Any = None) -> Any:
        return self[j] if j in self._dicts else default

    def __contains__(self, j: object) -> bool:
        return j in self._dicts

    def __setitem__(self, j: int, slot: Mapping[str, Any]) -> None:
        new = slot if type(slot) is dict else dict(slot.items())
        self._untype(j)
        self._dicts[j] = new

    def __delitem__(self, j: int) -> None:
        self._untype(j)
        del self._dicts[j]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._dicts))

    def __len__(self) -> int:
        return len(self._dicts)

    def __repr__(self) -> str:  # as torch's `defaultdict(dict)`, which it stands for
        slots = {j: dict(self[j].items()) for j in self._dicts}
        return f"defaultdict(<class 'dict'>, {slots!r})"

    # -- reads and writes of one slot ----------------------------------------------------------

    def _read(self, j: int, name: str) -> Any:
        value = self._dicts[j][name]
        if value is TYPED:
            record, k = self._typed[j]
            return record.read(k, name)
        return value

    def _writable(self, j: int) -> dict[str, Any]:
        """Slot `j`'s dict, its typed values written back into it (the next step gathers)."""
        self._untype(j)
        return self._dicts.setdefault(j, {})

    def _untype(self, j: int) -> None:
        """Write the typed state holding slot `j` (every slot of it) back into the dicts."""
        held = self._typed.get(j)
        if held is not None:
            self._materialize(held[0])

    def _materialize(self, record: _Record) -> None:
        for k, j in enumerate(record.slots):
            slot = self._dicts[j]
            for name, value in slot.items():
                if value is TYPED:
                    slot[name] = record.read(k, name)
            del self._typed[j]

    # -- typed bucket states -------------------------------------------------------------------

    def empty(self, slots: Sequence[int]) -> bool:
        """Whether none of `slots` has any state (without making a view of each)."""
        return not any(map(self._dicts.get, slots))

    def typed(self, slots: tuple[int, ...]) -> Any:
        """The typed state kept for exactly the bucket `slots` (None: gather from the dicts)."""
        held = self._typed.get(slots[0])
        if held is None or held[0].slots != slots:
            return None
        return held[0].state

    def store(
        self,
        slots: tuple[int, ...],
        new_state: NamedTuple,
        shared: frozenset[str],
        state_type: Callable[..., NamedTuple],
    ) -> None:
        """Keep a bucket's new typed state: each slot shows its `shared` fields (the step
        count, scalars) and the fields with a value for it, over what its dict held before."""
        held = self._typed.get(slots[0])
        if held is not None and held[0].slots != slots:
            held = None
        fields = new_state._fields
        names = frozenset(n for n, v in zip(fields, new_state) if n in shared or v is not None)
        if (
            held is not None
            and held[0].uniform == names
            and all(
                all(x is not None for x in new_state[i])
                for i, n in enumerate(fields)
                if n in names and n not in shared
            )
        ):  # the same fields as the last step: nothing of the dicts is read
            kept = {
                n: v if n in shared or v is None else list(v) for n, v in zip(fields, new_state)
            }
            record = _Record(slots, state_type(**kept), shared, names)
            for k, j in enumerate(slots):
                self._typed[j] = (record, k)
            return
        present = [
            {
                name
                for name, value in zip(fields, new_state, strict=True)
                if name in shared or (value is not None and value[k] is not None)
            }
            for k in range(len(slots))
        ]
        for k, j in enumerate(slots):
            if held is None or any(
                v is TYPED and n not in present[k] for n, v in self._dicts[j].items()
            ):
                self._untype(j)
        values: dict[str, Any] = {}
        for name, value in zip(fields, new_state, strict=True):
            if name in shared:
                values[name] = value
                continue
            column = [
                value[k] if name in present[k] else self._dicts.get(j, {}).get(name)
                for k, j in enumerate(slots)
            ]
            values[name] = None if all(v is None for v in column) else column
        same = all(p == present[0] for p in present) and not any(
            n in self._dicts.get(j, ()) for j in slots for n in fields if n not in present[0]
        )
        record = _Record(
            slots, state_type(**values), shared, frozenset(present[0]) if same else None
        )
        for k, j in enumerate(slots):
            slot = self._dicts.setdefault(j, {})
            for name in fields:
                if name in present[k]:
                    slot[name] = TYPED
            self._typed[j] = (record, k)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GroupState:
        """A copy with `fn` applied to every tensor, the layout kept."""
        out = GroupState()

        def swap(x: Any) -> Any:
            return fn(x) if isinstance(x, torch.Tensor) else x

        out._dicts = {j: {k: swap(v) for k, v in slot.items()} for j, slot in self._dicts.items()}
        records: dict[int, _Record] = {}
        for j, (record, k) in self._typed.items():
            if id(record) not in records:
                state = pytree.tree_map(swap, record.state)
                records[id(record)] = _Record(record.slots, state, record.shared, record.uniform)
            out._typed[j] = (records[id(record)], k)
        return out

    def detach_(self) -> None:
        """Detach every tensor held, in place (a first-order step's state)."""
        for slot in self._dicts.values():
            for key, value in slot.items():
                if isinstance(value, torch.Tensor):
                    slot[key] = value.detach()
        done: dict[int, _Record] = {}
        for j, (record, k) in self._typed.items():
            new = done.get(id(record))
            if new is None:
                state = type(record.state)(*map(_detached, record.state))
                new = done[id(record)] = _Record(record.slots, state, record.shared, record.uniform)
            self._typed[j] = (new, k)


def _detached(value: Any) -> Any:
    """A typed state's field detached: a tensor, or a list of them (None kept)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, list):
        return [v.detach() if isinstance(v, torch.Tensor) else v for v in value]
    return value


def detach_state(group_state: MutableMapping[int, Any]) -> None:
    """Detach every tensor of a group's state, in place."""
    if isinstance(group_state, GroupState):
        group_state.detach_()
        return
    for slot in group_state.values():
        for key, value in slot.items():
            if isinstance(value, torch.Tensor):
                slot[key] = value.detach()


def as_states(states: Sequence[Mapping[int, Mapping[str, Any]]]) -> list[GroupState]:
    """`states` (one mapping of slot -> state per group) as group states."""
    return [s if isinstance(s, GroupState) else GroupState(s) for s in states]
