"""Fast weights of one functional module tree: where each lives, and its history over time.

The functional tree is a copy of the user's module whose parameter slots (`module._parameters`
entries) hold plain tensors: the current fast weights. Every place a weight occupies (a tied weight
has several, a shared submodule one) is resolved once, when the tree is built, so setting new fast
weights is a flat loop of dict writes and a forward is the user's own forward, untouched.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._errors import PatchError

Params = Sequence[torch.Tensor] | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]


class _Spec(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


#: a tensor's (shape, dtype, device), what `_Spec` holds
_SPEC_OF = operator.attrgetter("shape", "dtype", "device")


class FastWeights:
    """History and placement of the fast weights of one functional tree (shared by its modules).

    The placement (which slot of which module holds which weight) is derived from the tree by
    `bind`; it refers to modules only weakly, so a tree and its store form no reference cycle and
    refcounting alone frees them.
    """

    def __init__(
        self,
        names: list[str],
        references: Sequence[torch.Tensor],
        source: torch.nn.Module | None,
        device: torch.device | None,
        history: list[list[torch.Tensor]] | None = None,
        track: bool = True,
        anchor: list[torch.Tensor] | None = None,
    ) -> None:
        """`history`: the fast weights so far, the current last (None: no fast weights of its
        own, as from `make_functional`); `track`: keep every step's; `anchor` (with
        copy_initial_weights=False, the module's own parameters): when not tracking, new fast
        weights pass gradients straight through to them (first-order MAML)."""
        self.names = names
        self.specs = [
            _Spec(t.shape, t.dtype, device if device is not None else t.device) for t in references
        ]
        self.writes: list[tuple[dict[str, torch.Tensor | None], str, int]] = []
        self.first_places: list[tuple[dict[str, torch.Tensor | None], str]] = []
        # RNNs keep their own list of weights besides `_parameters`: (module, [(j, i), ...]).
        self.rnn_writes: list[tuple[weakref.ref[torch.nn.Module], list[tuple[int, int]]]] = []
        self.history: list[list[torch.Tensor]] = [] if history is None else history
        self.track = track
        self.keep = True  # keep the weights of every step (False: only the latest)
        self.substitutes: list[list[torch.Tensor]] = []  # the weights of `using` blocks
        self.stateless = history is None
        self.transient = 0  # depth of calls running with weights that stay out of the history
        self.slot_only = 0  # depth of code writing slots directly (loading, 0.2.1 helpers)
        self.anchor = anchor
        self.source = weakref.ref(source) if source is not None else None

    def bind(self, root: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> None:
        """Find the slots of each weight in the tree `root` (from `_higher_slot_index`;
        `modules`: the tree's `root.modules()`, when known)."""
        writes: list[tuple[dict[str, torch.Tensor | None], str, int]] = []
        first: dict[int, tuple[dict[str, torch.Tensor | None], str]] = {}
        rnn: list[tuple[weakref.ref[torch.nn.Module], list[tuple[int, int]]]] = []
        for module in root.modules() if modules is None else modules:
            index: dict[str, int] = module.__dict__.get("_higher_slot_index", {})
            slots = module._parameters
            for name, i in index.items():
                writes.append((slots, name, i))  # type: ignore[arg-type]
                first.setdefault(i, (slots, name))  # type: ignore[arg-type]
            flat_names = list(module.__dict__.get("_flat_weights_names", ()))
            pairs = [(flat_names.index(n), i) for n, i in index.items() if n in flat_names]
            if pairs:
                rnn.append((weakref.ref(module), pairs))
        self.writes = writes
        self.first_places = [first[i] for i in sorted(first)]
        self.rnn_writes = rnn

    def __deepcopy__(self, memo: dict[int, Any]) -> FastWeights:
        # The placement is not copied: the copy is bound to the copied tree (`bind`).
        new = FastWeights.__new__(FastWeights)
        memo[id(self)] = new
        new.__dict__["slot_only"] = 1  # a class's own __setstate__ may assign weights: slots only
        for key, value in self.__dict__.items():
            if key == "slot_only":
                continue
            if key in ("writes", "first_places", "rnn_writes"):
                new.__dict__[key] = []
            elif key == "source":
                new.__dict__[key] = value  # the same original module
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    # ---- validation -------------------------------------------------------------------------

    def check(self, params: Params, what: str = "params") -> list[torch.Tensor]:
        """Return `params` as a list in parameter order, or raise naming the offending entry."""
        specs = self.specs
        if type(params) is list and len(params) == len(specs):
            try:  # the common case, checked in one pass; anything else is explained below
                if list(map(_SPEC_OF, params)) == specs:  # (a `_Spec` is a tuple)
                    return list(params)  # a copy: the history must not change with the caller's
            except AttributeError:
                pass
        if isinstance(params, torch.Tensor):
            raise PatchError(
                f"{what} must be a sequence of {len(self.names)} tensors or a mapping from "
                "parameter name to tensor, got a single Tensor"
            )
        params = self._from_mapping(params, what) if isinstance(params, Mapping) else list(params)
        if len(params) != len(self.specs):
            raise PatchError(
                f"{what} has {len(params)} tensors, expected {len(self.specs)} "
                f"(one per parameter, in the order of module.parameters(): {self._name_list()})"
            )
        for i, (t, spec) in enumerate(zip(params, self.specs)):
            if not isinstance(t, torch.Tensor):
                raise PatchError(
                    f"{what}[{i}] (parameter {self.names[i]!r}) must be a Tensor, "
                    f"got {type(t).__name__}"
                )
            if t.shape != spec.shape or t.dtype != spec.dtype or t.device != spec.device:
                self._mismatch(i, t, spec, what)
        return params

    def _from_mapping(self, params: Mapping[str, torch.Tensor], what: str) -> list[torch.Tensor]:
        unknown = [k for k in params if k not in self._name_set()]
        if unknown:
            raise PatchError(
                f"{what} has unknown parameter names {unknown}; expected names from "
                f"{self._name_list()}"
            )
        missing = [n for n in self.names if n not in params]
        if missing:
            raise PatchError(f"{what} lacks tensors for parameters {missing}")
        return [params[n] for n in self.names]

    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def _name_list(self) -> str:
        shown = ", ".join(self.names[:6])
        return f"[{shown}{', ...' if len(self.names) > 6 else ''}]"

    def _mismatch(self, i: int, t: torch.Tensor, spec: _Spec, what: str) -> None:
        for field, got, expected in (
            ("shape", tuple(t.shape), tuple(spec.shape)),
            ("dtype", t.dtype, spec.dtype),
            ("device", t.device, spec.device),
        ):
            if got != expected:
                raise PatchError(
                    f"{what}[{i}] (parameter {self.names[i]!r}) has {field} {got}, "
                    f"expected {expected}"
                )

    # ---- placement --------------------------------------------------------------------------

    def place(self, params: Sequence[torch.Tensor | None]) -> None:
        """Write `params` into every slot of the tree (no validation: callers check first)."""
        for slots, name, i in self.writes:
            slots[name] = params[i]
        for ref, pairs in self.rnn_writes:
            module = ref()
            if module is None:
                continue
            flat = module.__dict__["_flat_weights"]
            refs = module.__dict__.get("_flat_weight_refs")  # newer torch checks these
            for j, i in pairs:
                t = params[i]
                flat[j] = t
                if refs is not None:
                    refs[j] = weakref.ref(t) if t is not None else None

    def current(self) -> list[torch.Tensor]:
        """The slot contents now (what a forward would use)."""
        # torch types the slots as Parameter | None; here they hold the plain fast weights
        return [slots[name] for slots, name in self.first_places]  # type: ignore[misc]

    # ---- history ----------------------------------------------------------------------------

    def set(self, params: list[torch.Tensor]) -> None:
        """Make `params` the current fast weights: appended to the history while tracking."""
        if self.track and self.keep:
            self.history.append(params)
        elif self.track:
            self.history = [params]
        else:
            if self.anchor is not None:
                params = [_straight_through(t, a) for t, a in zip(params, self.anchor)]
            self.history = [params]
        self.place(params)

    def at(self, time: int | None) -> list[torch.Tensor]:
        """The fast weights at step `time` (the latest when None)."""
        if self.stateless:
            raise PatchError(
                "this functional module has no fast weights of its own (made by make_functional): "
                "pass params= to each call"
            )
        if time is None:
            return self.substitutes[-1] if self.substitutes else self.history[-1]
        if not isinstance(time, int) or isinstance(time, bool):
            raise PatchError(f"time must be an int or None, got {type(time).__name__}")
        n = len(self.history)
        if not self.track and time not in (0, -1):
            raise PatchError(
                f"time={time} is not available: with track_higher_grads=False only the current "
                "fast weights are kept (time=0 or time=-1)"
            )
        if not self.keep and time != -1:
            raise PatchError(
                f"time={time} is not available: with keep_history=False only the current fast "
                "weights are kept (time=-1, or time=None)"
            )
        if not -n <= time < n:
            raise PatchError(
                f"time={time} is out of range: {n} step(s) recorded, valid times are {-n}..{n - 1}"
            )
        return self.history[time]

    def replace_one(self, index: int, value: torch.Tensor) -> None:
        """Replace one fast weight in the current step (attribute assignment on a submodule)."""
        self.replace_many({index: value})

    def replace_many(self, values: Mapping[int, torch.Tensor]) -> None:
        """Replace fast weights in the current step, adding no history entry."""
        for index, value in values.items():
            spec = self.specs[index]
            if (value.shape, value.dtype, value.device) != (spec.shape, spec.dtype, spec.device):
                self._mismatch(index, value, spec, "assigned value")
        current = list(self.history[-1]) if self.history else self.current()
        for index, value in values.items():
            current[index] = value
        if self.history:
            self.history[-1] = current
        else:
            self.history.append(current)
        self.place(current)

    def write_slot(self, index: int, value: torch.Tensor | None) -> None:
        """Put `value` in every slot of weight `index`, leaving the history as it is."""
        if not self.first_places:
            return  # not bound to a tree yet (being copied): the slots are set when bound
        current: list[torch.Tensor | None] = list(self.current())
        current[index] = value
        self.place(current)


def _straight_through(new: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`new`'s value, with the gradient of whatever uses it passed unchanged to `anchor`.

    This is the first-order approximation (d new / d anchor taken as identity): the value is
    exact (`x + 0`), and the graph holds one node per weight, not the inner loop.
    """
    if new is anchor or not anchor.requires_grad:
        return new
    out = new.detach() + (anchor - anchor.detach())
    out.retain_grad()  # 0.2.1 code reads .grad of the fast weights after backward
    return out
