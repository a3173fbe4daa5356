"""The functional module: a copy of the user's module whose parameters are fast weights."""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._errors import PatchError
from ._store import FastWeights, Params, Place

_CHILD_CLASSES: dict[type[torch.nn.Module], type[torch.nn.Module]] = {}
_ROOT_CLASSES: dict[type[torch.nn.Module], type[FunctionalModule]] = {}


def _in_functorch_transform() -> bool:
    # Tensors of a vmap/grad/jvp level must not outlive it: such calls never touch the history.
    return torch._C._functorch.peek_interpreter_stack() is not None


def _child_class(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """A subclass of `cls` whose fast-weight attributes route assignment to the fast weights."""
    child = _CHILD_CLASSES.get(cls)
    if child is None:

        def __setattr__(self: torch.nn.Module, name: str, value: Any) -> None:
            index = self.__dict__.get("_higher_slot_index")
            if index is not None and name in index and isinstance(value, torch.Tensor):
                store: FastWeights = self.__dict__["_higher_store"]
                if store.stateless:
                    raise PatchError(
                        f"cannot assign {name!r}: this functional module has no fast weights "
                        "of its own (made by make_functional); pass params= to each call"
                    )
                store.replace_one(index[name], value)
                return
            cls.__setattr__(self, name, value)

        def _apply(self: torch.nn.Module, fn: Any, recurse: bool = True) -> torch.nn.Module:
            raise PatchError(
                "a functional module's fast weights cannot be moved or cast in place; move or cast "
                "the original module and patch it again, or use monkeypatch(module, device=...)"
            )

        namespace = {
            "__setattr__": __setattr__,
            "_apply": _apply,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        child = type(cls.__name__, (cls,), namespace)
        _CHILD_CLASSES[cls] = child
    return child


def _root_class(cls: type[torch.nn.Module]) -> type[FunctionalModule]:
    root = _ROOT_CLASSES.get(cls)
    if root is None:
        name = f"Functional{cls.__name__}"
        root = type(name, (FunctionalModule, _child_class(cls)), {"__qualname__": name})
        _ROOT_CLASSES[cls] = root
    return root


class FunctionalModule(torch.nn.Module):
    """A stateless copy of a module, run with fast weights (returned by `monkeypatch`).

    The object is also an instance of the original module's class, so its custom methods and
    attributes work and read the current fast weights. `fmodel(x, params=p)` makes `p` the
    current fast weights (kept in the history while tracking) and runs the module's own forward.

    Examples:
        >>> net = torch.nn.Linear(3, 1)
        >>> fnet = higher.patch.monkeypatch(net)
        >>> w, b = fnet.parameters()
        >>> y = fnet(torch.ones(2, 3), params=[w * 2, b])
        >>> len(list(fnet.parameters(time=1)))
        2
    """

    _higher_store: FastWeights

    # ---- calling -----------------------------------------------------------------------------

    def __call__(self, *args: Any, params: Params | None = None, **kwargs: Any) -> Any:
        return self._higher_run(super().__call__, params, args, kwargs)

    def forward(self, *args: Any, params: Params | None = None, **kwargs: Any) -> Any:
        """Run the original forward with the current fast weights, or with `params` first set."""
        return self._higher_run(super().forward, params, args, kwargs)

    def _higher_run(
        self,
        run: Callable[..., Any],
        params: Params | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        store = self._higher_store
        if params is None:
            self._higher_require_weights()
            return run(*args, **kwargs)
        checked = store.check(params)
        if not (store.stateless or _in_functorch_transform()):
            store.set(checked)
            return run(*args, **kwargs)
        # Weights for this call only: swapped in, and out again even on error.
        before = store.current()
        store.place(checked)
        store.transient += 1
        try:
            return run(*args, **kwargs)
        finally:
            store.transient -= 1
            store.place(before)

    def _higher_require_weights(self) -> None:
        store = self._higher_store
        if store.stateless and not store.transient:
            raise PatchError(
                "this functional module has no fast weights of its own (made by make_functional): "
                "call it with params="
            )

    # ---- fast weights ------------------------------------------------------------------------

    def parameters(self, time: int | None = None) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """Iterate over the fast weights at step `time` (the latest by default; 0 is the first)."""
        return iter(self._higher_store.at(time))

    def named_fast_params(self, time: int | None = None) -> dict[str, torch.Tensor]:
        """The fast weights at step `time` by name: the names `torch.func.functional_call` uses."""
        return dict(zip(self._higher_store.names, self._higher_store.at(time)))

    @property
    def fast_params(self) -> list[torch.Tensor]:
        """The current fast weights; setting them appends to the history while tracking."""
        return list(self._higher_store.at(None))

    @fast_params.setter
    def fast_params(self, value: Params) -> None:
        self._higher_set(value, "fast_params")

    def _higher_set(self, value: Params, what: str) -> None:
        store = self._higher_store
        checked = store.check(value, what=what)
        store.stateless = False
        store.set(checked)

    @property
    def init_fast_params(self) -> list[torch.Tensor]:
        """The fast weights at time 0 (only while tracking: otherwise no history is kept)."""
        if not self._higher_store.track:
            raise PatchError(
                "init_fast_params is not kept with track_higher_grads=False; "
                "use fast_params for the current weights"
            )
        if not self._higher_store.keep:
            raise PatchError(
                "init_fast_params is not kept with keep_history=False; "
                "use fast_params for the current weights"
            )
        return list(self._higher_store.at(0))

    def update_params(self, params: Params) -> None:
        """Make `params` the current fast weights (appended to the history while tracking)."""
        self._higher_set(params, "params")  # not through the setter: nn.Module.__setattr__ is slow

    @property
    def track_higher_grads(self) -> bool:
        """Whether the fast-weight history is kept for higher-order gradients."""
        return self._higher_store.track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise PatchError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        self._higher_store.track = value

    @property
    def keep_history(self) -> bool:
        """Whether the fast weights of every step are kept (`parameters(time=t)`); with False
        only the current ones are, so a long unroll does not hold each step's weights.

        Examples:
            >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(2, 1))
            >>> fnet.keep_history = False
            >>> fnet.update_params([p * 2 for p in fnet.parameters()])
            >>> len(list(fnet.parameters())), fnet.keep_history
            (2, False)
        """
        return self._higher_store.keep

    @keep_history.setter
    def keep_history(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise PatchError(f"keep_history must be a bool, got {type(value).__name__}")
        store = self._higher_store
        store.keep = value
        if not value and len(store.history) > 1:
            store.history = store.history[-1:]

    @contextlib.contextmanager
    def using(self, params: Params) -> Iterator[list[torch.Tensor]]:
        """Run a block with `params` as the fast weights, outside the history.

        Inside the block the module's forward, `fast_params` and `parameters()` see `params`;
        nothing is recorded, and the fast weights are as before when the block ends (even on
        error). For code that re-runs a forward with the weights of another step (the memory
        modes of `higher.innerloop_ctx` recompute steps this way).

        Examples:
            >>> fnet = higher.patch.monkeypatch(torch.nn.Linear(1, 1, bias=False))
            >>> with fnet.using([torch.full((1, 1), 3.0)]):
            ...     print(fnet(torch.ones(1, 1)).item())
            3.0
            >>> len(list(fnet.parameters(time=0))), fnet.weight.item() != 3.0
            (1, True)
        """
        store = self._higher_store
        checked = store.check(params)
        before = store.current()
        store.place(checked)
        store.substitutes.append(checked)
        store.transient += 1
        try:
            yield checked
        finally:
            store.transient -= 1
            store.substitutes.pop()
            store.place(before)

    @contextlib.contextmanager
    def vacated(self) -> Iterator[list[torch.Tensor]]:
        """Empty the module's parameter slots for a block; yields the current fast weights.

        For tracing a call that passes every weight explicitly (`torch.func.functional_call`
        under `torch.compile`): with the slots empty, the module holds no tensor that aliases the
        call's inputs, which the compiler would otherwise check at every call. The slots hold the
        latest fast weights again when the block ends, even on error.

        Examples:
            >>> net = torch.nn.Linear(2, 1)
            >>> fnet = higher.patch.monkeypatch(net)
            >>> with fnet.vacated() as weights:
            ...     y = torch.func.functional_call(fnet, dict(fnet.named_fast_params()),
            ...                                    (torch.ones(1, 2),))
            ...     print(fnet.weight is None, len(weights))
            True 2
            >>> fnet.weight.shape  # the slots hold the fast weights again
            torch.Size([1, 2])
        """
        store = self._higher_store
        current = store.at(None)
        store.place([None] * len(current))
        try:
            yield current
        finally:
            store.place(store.at(None))

    # ---- buffers -----------------------------------------------------------------------------

    def write_back_buffers(self, module: torch.nn.Module | None = None) -> None:
        """Copy this module's buffers (e.g. BatchNorm running statistics) into `module`.

        `module` defaults to the module this one was made from. Buffers are copied in place, so
        the original keeps its tensors (and optimizer or hook references to them stay valid).
        """
        from ._api import write_back_buffers

        write_back_buffers(self, module)

    # ---- copying -----------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> FunctionalModule:
        # Tensors with history cannot be deep-copied: the copy gets detached clones of them.
        history = itertools.chain.from_iterable(self._higher_store.history)
        for t in itertools.chain(_tensors_of(self), history):
            if id(t) not in memo and not t.is_leaf:
                memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        # The instance dict, not __getstate__: parametrized modules refuse the latter.
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        store = new._higher_store
        if not store.stateless:
            store.place(store.history[-1])  # refresh caches keyed on tensor identity (RNNs)
        return new


def _tensors_of(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module tree holds: parameters, buffers and plain tensor attributes."""
    for m in module.modules():
        for d in (m._parameters, m._buffers, m.__dict__):
            for v in d.values():
                if isinstance(v, torch.Tensor):
                    yield v
        for v in m.__dict__.get("_flat_weights", ()):
            if isinstance(v, torch.Tensor):
                yield v


# Attribute values a module copy can share with the original: immutable, nothing to copy.
_SHARED_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_TENSOR_DICTS = ("_parameters", "_buffers")
_EMPTY_COPYABLE = (dict, collections.OrderedDict, set, list)


def _copy_tree(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    """`copy.deepcopy(module, memo)`, several times faster for plain module trees.

    Each module is copied attribute by attribute: immutable values are shared, parameter and
    buffer dicts take their tensors from `memo`, submodules recurse (a shared submodule is
    copied once), and anything else goes through `copy.deepcopy` with the same memo. Modules
    with a copy protocol of their own (parametrized modules define `__deepcopy__`) use it.
    """
    found = memo.get(id(module))
    if found is not None:
        return found  # type: ignore[no-any-return]
    cls = type(module)
    if getattr(cls, "__deepcopy__", None) is not None or "__slots__" in cls.__dict__:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key in _TENSOR_DICTS:
            state[key] = type(value)(
                (name, None if t is None else memo.get(id(t), t)) for name, t in value.items()
            )
        elif key == "_modules":
            state[key] = type(value)(
                (name, None if m is None else _copy_tree(m, memo)) for name, m in value.items()
            )
        elif type(value) in _SHARED_TYPES:
            state[key] = value
        elif type(value) in _EMPTY_COPYABLE and not value:  # most hook dicts: a fresh empty one
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def functional_tree(
    module: torch.nn.Module,
    initial: list[torch.Tensor] | None,
    device: torch.device | None,
) -> FunctionalModule:
    """Copy `module` into a functional tree whose slots hold `initial` (or nothing yet)."""
    if not isinstance(module, torch.nn.Module):
        raise PatchError(f"expected a torch.nn.Module to patch, got {type(module).__name__}")
    if isinstance(module, FunctionalModule) or "_higher_store" in module.__dict__:
        raise PatchError(
            f"{type(module).__name__} is already a functional module; patch the original module"
        )
    unique = list(module.parameters())
    memo: dict[int, Any] = {}
    for i, p in enumerate(unique):
        memo[id(p)] = None if initial is None else initial[i]
    for b in module.buffers():
        memo[id(b)] = b.detach().to(device, copy=True) if device is not None else b.detach().clone()
    for t in _tensors_of(module):  # plain tensor attributes that carry a graph (weight_norm's)
        if id(t) not in memo and not t.is_leaf:
            memo[id(t)] = t.detach()
    fmodule = _copy_tree(module, memo)

    # Resolve every place each weight occupies, once: tied weights and shared submodules.
    index_of = {id(p): i for i, p in enumerate(unique)}
    names = [name for name, _ in module.named_parameters()]  # same order as parameters()
    places: list[list[tuple[torch.nn.Module, str]]] = [[] for _ in unique]
    copies = dict(zip((id(m) for m in module.modules()), fmodule.modules()))
    seen: set[tuple[int, str]] = set()
    for orig in module.modules():
        for pname, param in orig._parameters.items():
            if param is None or (id(orig), pname) in seen:
                continue
            seen.add((id(orig), pname))
            places[index_of[id(param)]].append((copies[id(orig)], pname))

    store = FastWeights(
        names,
        [[Place(m, n) for m, n in ps] for ps in places],
        unique,
        source=module,
        device=device,
    )
    slot_index: dict[int, dict[str, int]] = {}
    for i, ps in enumerate(places):
        for m, n in ps:
            slot_index.setdefault(id(m), {})[n] = i
    for m in fmodule.modules():
        m.__dict__["_higher_store"] = store
        m.__dict__["_higher_slot_index"] = slot_index.get(id(m), {})
        m.__class__ = _child_class(type(m))
    fmodule.__class__ = _root_class(type(module))
    assert isinstance(fmodule, FunctionalModule)
    if initial is not None:
        store.place(initial)
    return fmodule
