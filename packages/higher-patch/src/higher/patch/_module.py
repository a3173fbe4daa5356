"""The functional module: a copy of the user's module whose parameters are fast weights."""

from __future__ import annotations

import copy
import copyreg
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import _buffers
from ._copying import _deepcopy_module, _original_class, _reconstruct, _tensors_of, slot_pairs
from ._errors import PatchError
from ._store import FastWeights, Params
from ._walk import Tree, walk

if TYPE_CHECKING:
    from typing_extensions import Self

_CHILD_CLASSES: dict[type[torch.nn.Module], type[torch.nn.Module]] = {}
_ROOT_CLASSES: dict[type[torch.nn.Module], type[FunctionalModule]] = {}


def _in_functorch_transform() -> bool:
    # Tensors of a vmap/grad/jvp level must not outlive it: such calls never touch the history.
    return torch._C._functorch.peek_interpreter_stack() is not None


def _store_of(module: torch.nn.Module) -> FastWeights:
    store: FastWeights = module.__dict__["_higher_store"]
    return store


class _FunctionalNode(torch.nn.Module):
    """Behaviour shared by every module of a functional tree (the root and its submodules).

    Assigning a fast-weight attribute replaces that fast weight; every `nn.Module` method that
    would write weights in place, or reach the original module's tensors, is made safe here or
    refused. The methods call on to the user's class (`super()`), so its overrides still run.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        index = self.__dict__.get("_higher_slot_index")
        if index is not None and name in index and isinstance(value, torch.Tensor):
            store = _store_of(self)
            if store.slot_only:  # loading, or 0.2.1's helpers: the slot only, no history
                self._parameters[name] = value  # type: ignore[assignment]
                store.write_slot(index[name], value)
                return
            if store.stateless:
                raise PatchError(
                    f"cannot assign {name!r}: this functional module has no fast weights "
                    "of its own (made by make_functional); pass params= to each call"
                )
            store.replace_one(index[name], value)
            return
        super().__setattr__(name, value)
        if name in self._buffers:
            _buffers.hold(self, name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        raise PatchError(
            "a functional module's fast weights cannot be moved or cast in place (to, cuda, "
            "double, to_empty, share_memory, ...); move or cast the original module and patch it "
            "again, or use monkeypatch(module, device=...)"
        )

    def register_parameter(self, name: str, param: torch.nn.Parameter | None) -> None:
        """Refused: a functional module's parameters are the fast weights fixed at patch time."""
        store = self.__dict__.get("_higher_store")
        if store is not None and not store.slot_only:
            raise PatchError(
                f"cannot register parameter {name!r} on a functional module: its parameters are "
                "the fast weights fixed when it was made; register it on the original module and "
                "patch again"
            )
        super().register_parameter(name, param)

    def _higher_indices(self) -> list[int]:
        """The fast weights this module and its submodules hold, in the store's order."""
        found = {
            i for m in self.modules() for i in m.__dict__.get("_higher_slot_index", {}).values()
        }
        return sorted(found)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the fast weights; the original module's `.grad` is left alone.

        With `copy_initial_weights=False` the first fast weights are the original parameters:
        their gradients belong to the outer loop, so they are skipped.

        Examples:
            >>> net = torch.nn.Linear(2, 1)
            >>> net(torch.ones(1, 2)).sum().backward()
            >>> fnet = higher.patch.monkeypatch(net, copy_initial_weights=False)
            >>> fnet.zero_grad()
            >>> net.weight.grad is None
            False
        """
        store = _store_of(self)
        protected = {id(t) for t in store.anchor or ()}
        for p in torch.nn.Module.parameters(self):
            if id(p) in protected or p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def requires_grad_(self, requires_grad: bool = True) -> Self:
        """Make the current fast weights (of this module and below) require grad, or not.

        The fast weights are replaced in the current step (no history entry): `False` detaches
        them, `True` makes frozen ones new leaves that require grad. The original module's
        parameters keep their flags.

        Examples:
            >>> net = torch.nn.Linear(2, 1)
            >>> fnet = higher.patch.monkeypatch(net, copy_initial_weights=False)
            >>> _ = fnet.requires_grad_(False)
            >>> [p.requires_grad for p in fnet.parameters()], net.weight.requires_grad
            ([False, False], True)
        """
        store = _store_of(self)
        if store.stateless:
            return self
        current = store.current()
        changes: dict[int, torch.Tensor] = {}
        for i in self._higher_indices():
            p = current[i]
            if p.requires_grad != requires_grad:
                changes[i] = p.detach().requires_grad_(True) if requires_grad else p.detach()
        if changes:
            store.replace_many(changes)
        return self

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load weights into the fast weights and buffers into this module's own buffers.

        The original module is never written. The loaded parameters become new fast weights: a
        new history entry while tracking (the current one is replaced when not tracking), with
        each weight's `requires_grad` kept; parameters missing from a non-strict `state_dict`
        keep their current fast weights. Buffers are loaded into the functional module's own
        copies. A rejected load (torch's error for missing, unexpected or mis-shaped keys)
        changes nothing.

        Examples:
            >>> net = torch.nn.Linear(2, 1)
            >>> fnet = higher.patch.monkeypatch(net, copy_initial_weights=False)
            >>> _ = fnet.load_state_dict({"weight": torch.zeros(1, 2), "bias": torch.ones(1)})
            >>> fnet.bias.tolist(), len(list(fnet.parameters(time=1))), net.bias.item() == 1.0
            ([1.0], 2, False)
        """
        store = _store_of(self)
        if store.stateless:
            raise PatchError(
                "load_state_dict: this functional module has no fast weights of its own (made by "
                "make_functional); set fmodel.fast_params, or pass params= to each call"
            )
        current = store.current()
        indices = self._higher_indices()
        scratch = list(current)
        for i in indices:  # torch copies into these, never into a fast weight or an original
            scratch[i] = current[i].detach().clone()
        saved = [
            (m._buffers, name, buf, buf.clone())
            for m in self.modules()
            for name, buf in m._buffers.items()
            if buf is not None
        ]
        store.place(scratch)
        store.slot_only += 1
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            loaded = store.current()
            new = list(current)
            given = self._higher_keys_given(state_dict)
            for i in indices:
                if i not in given:
                    continue
                t = loaded[i].detach()
                spec = store.specs[i]
                if (t.shape, t.dtype, t.device) != (spec.shape, spec.dtype, spec.device):
                    store._mismatch(i, t, spec, "state_dict entry")
                new[i] = t.requires_grad_(current[i].requires_grad)
        except BaseException:
            with torch.no_grad():
                for slots, name, buf, value in saved:
                    slots[name] = buf
                    buf.copy_(value)
            store.place(current)
            raise
        finally:
            store.slot_only -= 1
        if given:
            store.set(new)
        else:
            store.place(current)
        return result

    def _higher_keys_given(self, state_dict: Mapping[str, Any]) -> set[int]:
        """The fast weights (by index) that `state_dict` holds a value for, under any name."""
        given: set[int] = set()
        for prefix, m in self.named_modules(remove_duplicate=False):
            head = f"{prefix}." if prefix else ""
            for name, i in m.__dict__.get("_higher_slot_index", {}).items():
                if head + name in state_dict:
                    given.add(i)
        return given

    # ---- copying and pickling --------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        """A copy as `copy.deepcopy` makes of the user's class; fast weights become detached copies.

        The copy honours the class's own `__deepcopy__`, `__reduce_ex__`, `__getstate__` and
        `__setstate__`. Tensors with history cannot be deep-copied, so the copy's fast weights
        (and history) are detached clones of them.
        """
        found = memo.get(id(self))
        if found is not None:
            return found  # type: ignore[no-any-return]
        store = _store_of(self)
        history = itertools.chain.from_iterable(store.history)
        for t in itertools.chain(_tensors_of(self), history):
            if id(t) not in memo and not t.is_leaf:
                memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
        new = _deepcopy_module(self, memo)
        new_store = copy.deepcopy(store, memo)
        pairs = [(m, m.__dict__.get("_higher_slot_index", {})) for m in self.modules()]
        _convert(new, pairs, new_store, root=isinstance(self, FunctionalModule))
        if not new_store.stateless:
            new_store.place(new_store.history[-1])
        copied: Self = new
        return copied

    def __copy__(self) -> Self:
        # A shallow copy as `copy.copy` makes of the user's class (not the pickling reduction).
        user = super()
        copier = getattr(user, "__copy__", None)
        if copier is not None:
            return copier()  # type: ignore[no-any-return]
        reductor = copyreg.dispatch_table.get(_original_class(self))
        rv = reductor(self) if reductor is not None else user.__reduce_ex__(4)
        if isinstance(rv, str):
            return self
        return _reconstruct(self, None, *rv)  # type: ignore[no-any-return]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The functional classes are made at run time, so pickle cannot find them by name: pickle
        # a plain copy of the user's module that holds the current fast weights (detached, as
        # deepcopy gives them) and the buffers, and make it functional again when loading.
        plain, earlier, store = _plain_copy(self)
        return (_rebuild_functional, (plain, earlier, store.track, store.stateless))


def _child_class(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """A subclass of `cls` whose fast-weight attributes route assignment to the fast weights."""
    child = _CHILD_CLASSES.get(cls)
    if child is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_higher_original": cls,
        }
        child = type(cls.__name__, (_FunctionalNode, cls), namespace)
        _CHILD_CLASSES[cls] = child
    return child


def _root_class(cls: type[torch.nn.Module]) -> type[FunctionalModule]:
    root = _ROOT_CLASSES.get(cls)
    if root is None:
        name = f"Functional{cls.__name__}"
        root = type(name, (FunctionalModule, _child_class(cls)), {"__qualname__": name})
        _ROOT_CLASSES[cls] = root
    return root


class FunctionalModule(_FunctionalNode):
    """A stateless copy of a module, run with fast weights (returned by `monkeypatch`).

    The object is also an instance of the original module's class, so its custom methods and
    attributes work and read the current fast weights. `fmodel(x, params=p)` makes `p` the
    current fast weights (kept in the history while tracking) and runs the module's own forward.
    It never writes the original module: `load_state_dict` loads into the fast weights,
    `zero_grad` and `requires_grad_` leave the original's tensors alone, and moving or casting in
    place (`to`, `double`, `share_memory`, ...) or `register_parameter` is refused.
    `copy.deepcopy` and `pickle` (or `torch.save`) work; the copy's fast weights are detached.

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
        _buffers.renew(self)  # what the forward updates in place is new (via __call__ too)
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

    # ---- buffers -----------------------------------------------------------------------------

    def write_back_buffers(self, module: torch.nn.Module | None = None) -> None:
        """Copy this module's buffers (e.g. BatchNorm running statistics) into `module`.

        `module` defaults to the module this one was made from. Buffers are copied in place, so
        the original keeps its tensors (and optimizer or hook references to them stay valid).
        """
        if module is None:
            source = self._higher_store.source
            module = source() if source is not None else None
            if module is None:
                raise PatchError("the original module is gone; pass the module to write back into")
        for qualname, fbuf in self.named_buffers():
            owner, name = buffer_owner(module, qualname)
            if name not in owner._buffers:
                raise PatchError(f"module has no buffer {qualname!r} to write back into")
            target = owner._buffers[name]
            value = fbuf.detach()
            if target is not None and target.shape == value.shape and target.dtype == value.dtype:
                with torch.no_grad():
                    target.copy_(value)
            else:
                owner._buffers[name] = value.clone()


def buffer_owner(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str]:
    """The submodule of `root` that holds the buffer `qualname`, and the buffer's own name."""
    prefix, _, name = qualname.rpartition(".")
    try:
        return root.get_submodule(prefix), name
    except AttributeError as err:
        raise PatchError(f"no submodule {prefix!r} to hold buffer {qualname!r}") from err


def _convert(
    new: torch.nn.Module,
    pairs: list[tuple[torch.nn.Module, dict[str, int]]],
    store: FastWeights,
    root: bool = True,
) -> list[torch.nn.Module]:
    """Make the copied tree `new` functional: `pairs` are the copied modules and slot indexes.
    Returns the copy's modules (`new.modules()`)."""
    copies = list(new.modules())
    for (orig, index), m in zip(pairs, copies):
        cls = _original_class(orig)
        if type(m) not in (cls, _CHILD_CLASSES.get(cls), _ROOT_CLASSES.get(cls)):
            break
        if any(name not in m._parameters for name in index):
            break
    else:
        if len(copies) == len(pairs):
            # (object.__setattr__: nn.Module's own would first look the name up among the
            # module's parameters, buffers and submodules)
            for (orig, index), m in zip(pairs, copies):
                m.__dict__["_higher_store"] = store
                m.__dict__["_higher_slot_index"] = index
                object.__setattr__(m, "__class__", _child_class(_original_class(orig)))
            if root:
                object.__setattr__(new, "__class__", _root_class(_original_class(pairs[0][0])))
            store.bind(new, copies)
            store.slot_only = 0  # a copied store writes slots only until bound
            return copies
    raise PatchError(
        f"the copy of {_original_class(pairs[0][0]).__name__} made by its copy protocol "
        "(__deepcopy__/__reduce_ex__) does not have the module's structure (the same submodules "
        "and parameter names, in order); a functional module cannot be made from it"
    )


def functional_tree(
    module: torch.nn.Module,
    initial: list[torch.Tensor] | None,
    device: torch.device | None,
    track: bool = True,
    anchor: list[torch.Tensor] | None = None,
    tree: Tree | None = None,
) -> FunctionalModule:
    """Copy `module` into a functional tree whose fast weights start at `initial` (None: it has
    none of its own, as from `make_functional`); `track` and `anchor` as `FastWeights` takes;
    `tree`: the module's walk, when known."""
    if not isinstance(module, torch.nn.Module):
        raise PatchError(f"expected a torch.nn.Module to patch, got {type(module).__name__}")
    if isinstance(module, FunctionalModule) or "_higher_store" in module.__dict__:
        raise PatchError(
            f"{type(module).__name__} is already a functional module; patch the original module"
        )
    tree = walk(module) if tree is None else tree
    memo: dict[int, Any] = {}
    for i, p in enumerate(tree.params):
        memo[id(p)] = None if initial is None else initial[i]
    for b in tree.buffers:
        memo[id(b)] = b.detach().to(device, copy=True) if device is not None else b.detach().clone()
    # plain tensor attributes that carry a graph (weight_norm's): detached in the copy (the
    # parameters and buffers, all in `memo` already, are passed over)
    for t in _tensors_of(module, tree.modules, attributes_only=True):
        if id(t) not in memo and not t.is_leaf:
            memo[id(t)] = t.detach()
    fmodule = _deepcopy_module(module, memo)
    history = None if initial is None else [initial]
    return _adopt(fmodule, module, history, device, module, track, anchor, tree)


def _adopt(
    tree: torch.nn.Module,
    model: torch.nn.Module,
    history: list[list[torch.Tensor]] | None,
    device: torch.device | None,
    source: torch.nn.Module | None,
    track: bool = True,
    anchor: list[torch.Tensor] | None = None,
    walked: Tree | None = None,
) -> FunctionalModule:
    """Make `tree`, a copy of `model` (or `model` itself), functional: its store built with
    `history` (its slots hold the last entry) and the other arguments of `FastWeights`;
    `walked`: the model's walk, when known."""
    walked = walk(model) if walked is None else walked
    unique = walked.params
    pairs = slot_pairs(model, walked)
    store = FastWeights(walked.names, unique, source, device, history, track, anchor)
    copies = _convert(tree, pairs, store)
    assert isinstance(tree, FunctionalModule)
    _buffers.hold_all(tree, copies)
    # No weights yet (make_functional): empty slots, even where a class's own copy protocol
    # built parameters of its own.
    store.place(history[-1] if history else [None] * len(unique))
    return tree


# ---- pickling -----------------------------------------------------------------------------


def _plain_copy(
    module: _FunctionalNode,
) -> tuple[torch.nn.Module, list[list[torch.Tensor]], FastWeights]:
    """A copy of the user's module tree holding the current fast weights as its parameters.

    Returns the copy, the earlier history (detached, in the copy's parameter order) and the
    copied store. A functional module without fast weights gets zero placeholders.
    """
    clone = copy.deepcopy(module)
    store = _store_of(clone)
    if store.stateless:
        weights: list[torch.Tensor] = [
            torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in store.specs
        ]
    else:
        weights = store.history[-1]
    params = [torch.nn.Parameter(t, requires_grad=t.requires_grad) for t in weights]
    store.place(params)
    for m in clone.modules():
        m.__dict__.pop("_higher_store")
        m.__dict__.pop("_higher_slot_index")
        m.__class__ = _original_class(m)
    position = {id(p): i for i, p in enumerate(params)}
    order = [position[id(p)] for p in clone.parameters()]
    earlier = [[entry[i] for i in order] for entry in store.history[:-1]]
    return clone, earlier, store


def _rebuild_functional(
    plain: torch.nn.Module, earlier: list[list[torch.Tensor]], track: bool, stateless: bool
) -> FunctionalModule:
    """Unpickle a functional module: `plain` becomes functional, its parameters the fast weights."""
    weights = [p.detach().requires_grad_(p.requires_grad) for p in plain.parameters()]
    history = None if stateless else [*earlier, weights]
    return _adopt(plain, plain, history, None, None, track)  # it is ours: no copy needed
