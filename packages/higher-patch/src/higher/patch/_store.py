"""Fast weights of one functional module tree: where each lives, and its history over time.

The functional tree is a copy of the user's module whose parameter slots (`module._parameters`
entries) hold plain tensors: the current fast weights. Every place a weight occupies (a tied weight
has several, a shared submodule one) is resolved once, when the tree is built, so setting new fast
weights is a flat loop of dict writes and a forward is the user's own forward, untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ._errors import PatchError

Params = Sequence[torch.Tensor] | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]


class Place(NamedTuple):
    """One place a fast weight occupies: `module._parameters[name]`."""

    module: torch.nn.Module
    name: str


class _Spec(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class FastWeights:
    """History and placement of the fast weights of one functional tree (shared by its modules)."""

    def __init__(
        self,
        names: list[str],
        places: list[list[Place]],
        references: Sequence[torch.Tensor],
        source: torch.nn.Module | None,
        device: torch.device | None,
    ) -> None:
        self.names = names
        self.specs = [
            _Spec(t.shape, t.dtype, device if device is not None else t.device) for t in references
        ]
        self.writes = [(p.module._parameters, p.name, i) for i, ps in enumerate(places) for p in ps]
        self.first_places = [(ps[0].module._parameters, ps[0].name) for ps in places]
        # RNNs keep their own list of weights besides `_parameters`: keep it in step.
        self.rnn_writes = [
            (p.module, list(getattr(p.module, "_flat_weights_names", ())).index(p.name), i)
            for i, ps in enumerate(places)
            for p in ps
            if p.name in getattr(p.module, "_flat_weights_names", ())
        ]
        self.history: list[list[torch.Tensor]] = []
        self.track = True
        self.keep = True  # keep the weights of every step (False: only the latest)
        self.substitutes: list[list[torch.Tensor]] = []  # the weights of `using` blocks
        self.stateless = True
        self.transient = 0  # depth of calls running with weights that stay out of the history
        # With copy_initial_weights=False: the module's own parameters. When not tracking, new
        # fast weights pass gradients straight through to them (first-order MAML).
        self.anchor: list[torch.Tensor] | None = None
        self.source = weakref.ref(source) if source is not None else None

    # ---- validation -------------------------------------------------------------------------

    def check(self, params: Params, what: str = "params") -> list[torch.Tensor]:
        """Return `params` as a list in parameter order, or raise naming the offending entry."""
        specs = self.specs
        if type(params) is list and len(params) == len(specs):
            try:  # the common case, checked in one pass; anything else is explained below
                if all(
                    t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
                    for t, s in zip(params, specs)
                ):
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
            slots[name] = params[i]  # type: ignore[assignment]
        for module, j, i in self.rnn_writes:
            t = params[i]
            module.__dict__["_flat_weights"][j] = t
            refs = module.__dict__.get("_flat_weight_refs")
            if refs is not None:  # newer torch checks these to see if weights changed
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
        spec = self.specs[index]
        if value.shape != spec.shape or value.dtype != spec.dtype or value.device != spec.device:
            self._mismatch(index, value, spec, "assigned value")
        current = list(self.history[-1]) if self.history else self.current()
        current[index] = value
        if self.history:
            self.history[-1] = current
        else:
            self.history.append(current)
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
