"""The copy engine: a user's module tree copied as `copy.deepcopy` copies it, and its slots.

`copy.deepcopy` semantics, honoured exactly: the class's own `__deepcopy__`, `copyreg`'s reducer
or `__reduce_ex__(4)` (which reads `__getstate__`), `__setstate__`, the memo. Only the copy of a
module's state dict is faster. The functional module (`_module.py`) builds its tree with this
engine and makes the copy functional; for a module of a functional tree, the protocol used is
the user's class's own (the class after the functional layer in the method resolution order).
"""

from __future__ import annotations

import collections
import copy
import copyreg
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._errors import PatchError
from ._walk import Tree, walk


def _original_class(module: torch.nn.Module) -> type[torch.nn.Module]:
    original: type[torch.nn.Module] = getattr(type(module), "_higher_original", type(module))
    return original


def _tensors_of(
    module: torch.nn.Module,
    modules: list[torch.nn.Module] | None = None,
    attributes_only: bool = False,
) -> Iterator[torch.Tensor]:
    """Every tensor a module tree holds: parameters, buffers and plain tensor attributes
    (`modules`: the tree's `module.modules()`, when known; `attributes_only`: the plain
    attributes only)."""
    for m in module.modules() if modules is None else modules:
        for d in (m.__dict__,) if attributes_only else (m._parameters, m._buffers, m.__dict__):
            for v in d.values():
                if isinstance(v, torch.Tensor):
                    yield v
        for v in m.__dict__.get("_flat_weights", ()):
            if isinstance(v, torch.Tensor):
                yield v


# ---- copying a module tree as copy.deepcopy does ---------------------------------------------

# Types `copy.deepcopy` returns as they are (its atomic types, and torch.dtype, which reduces to
# its own name); a copy can share them.
_ATOMIC = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        type(Ellipsis),
        type(NotImplemented),
        types.CodeType,
        types.FunctionType,
        types.BuiltinFunctionType,
        weakref.ref,
        property,
        torch.dtype,
    }
)
_TENSOR_DICTS = ("_parameters", "_buffers")
_DICTS = (dict, collections.OrderedDict)
_EMPTY_COPYABLE = (dict, collections.OrderedDict, set, list)
_MISSING = object()


def _deepcopy_module(module: torch.nn.Module, memo: dict[int, Any]) -> Any:
    """`copy.deepcopy(module, memo)`, step for step, with a faster copy of a module's state.

    The copy protocol is the module class's own, run as `copy.deepcopy` runs it: its
    `__deepcopy__` if it has one, else `copyreg`'s reducer or `__reduce_ex__(4)` (which reads
    `__getstate__`), the object rebuilt from the reduction and given the copied state through
    `__setstate__`. Only the copy of a state dict is faster, and gives what `copy.deepcopy`
    gives: values `copy.deepcopy` returns unchanged are shared, parameter and buffer dicts take
    their tensors from `memo` (where every one of them is), empty containers are made afresh,
    submodules recurse here, and everything else goes through `copy.deepcopy` with the same memo.
    For a module of a functional tree the protocol is that of the user's class.
    """
    found = memo.get(id(module), _MISSING)
    if found is not _MISSING:
        return found
    user = _user_protocol(module)
    if user is module and _torch_protocol(type(module)):
        return _copy_plain(module, memo)
    copier = getattr(user, "__deepcopy__", None)
    if copier is not None:
        new = copier(memo)
    else:
        reductor = copyreg.dispatch_table.get(_original_class(module))
        rv = reductor(module) if reductor is not None else user.__reduce_ex__(4)
        new = module if isinstance(rv, str) else _reconstruct(module, memo, *rv)
    if new is module:
        raise PatchError(
            f"copy.deepcopy of {type(module).__name__} returns the module itself; a functional "
            "module needs a copy it can own (check the class's __deepcopy__ or __reduce_ex__)"
        )
    memo[id(module)] = new
    return new


_MODULE_STATE = (torch.nn.Module.__getstate__, torch.nn.Module.__setstate__)
_OBJECT_REDUCE: tuple[Any, Any] = (object.__reduce_ex__, object.__reduce__)


def _torch_protocol(cls: type) -> bool:
    """Whether `cls` copies by `torch.nn.Module`'s protocol as it is: no `__deepcopy__`,
    reducer or new-args of its own, torch's `__getstate__` and `__setstate__` (most modules;
    worked out once per class, as `_walk` does), and no `copyreg` entry (asked every time)."""
    plain = _TORCH_PROTOCOL.get(cls)
    if plain is None:
        plain = _TORCH_PROTOCOL[cls] = (
            getattr(cls, "__deepcopy__", None) is None
            and getattr(cls, "__reduce_ex__", None) is _OBJECT_REDUCE[0]
            and getattr(cls, "__reduce__", None) is _OBJECT_REDUCE[1]
            and (getattr(cls, "__getstate__", None), getattr(cls, "__setstate__", None))
            == _MODULE_STATE
            and getattr(cls, "__getnewargs_ex__", None) is None
            and getattr(cls, "__getnewargs__", None) is None
            and not issubclass(cls, (list, dict))
        )
    return plain and cls not in copyreg.dispatch_table


_TORCH_PROTOCOL: dict[type, bool] = {}


def _copy_plain(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    """`_deepcopy_module` of a module of a `_torch_protocol` class: what its reduction
    (`copyreg.__newobj__`, the state `__getstate__` gives) and `_reconstruct` do, without
    asking for the reduction."""
    cls = type(module)
    new: torch.nn.Module = cls.__new__(cls)
    memo[id(module)] = new
    state = module.__getstate__()
    memo.setdefault(id(memo), []).append(state)  # keep it alive: memo keys are ids
    new.__setstate__(_copy_state(state, memo))
    return new


def _reconstruct(
    x: Any,
    memo: dict[int, Any] | None,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    state: Any = None,
    listiter: Iterator[Any] | None = None,
    dictiter: Iterator[tuple[Any, Any]] | None = None,
) -> Any:
    """Rebuild `x` from its reduction, as `copy` does (deep when a memo is given)."""
    deep = memo is not None
    if memo is not None and args and not all(_shared(a) for a in args):
        args = copy.deepcopy(args, memo)  # (a tuple of values it shares is itself, unchanged)
    new = func(*args)
    if memo is not None:
        memo[id(x)] = new
    if state is not None:
        if memo is not None:
            memo.setdefault(id(memo), []).append(state)  # keep it alive: memo keys are ids
            state = _copy_state(state, memo) if type(state) is dict else copy.deepcopy(state, memo)
        if hasattr(new, "__setstate__"):
            new.__setstate__(state)
        else:
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            if state is not None:
                new.__dict__.update(state)
            if slotstate is not None:
                for key, value in slotstate.items():
                    setattr(new, key, value)
    if listiter is not None:
        for item in listiter:
            new.append(copy.deepcopy(item, memo) if deep else item)
    if dictiter is not None:
        for key, value in dictiter:
            if memo is not None:
                key, value = copy.deepcopy(key, memo), copy.deepcopy(value, memo)
            new[key] = value
    return new


def _copy_state(state: dict[Any, Any], memo: dict[int, Any]) -> dict[Any, Any]:
    """`copy.deepcopy(state, memo)` for a module's state dict (see `_deepcopy_module`)."""
    new: dict[str, Any] = {}
    memo[id(state)] = new
    for key, value in state.items():
        if type(key) is not str:  # what is copied so far stays in the memo, where deepcopy
            del memo[id(state)]  # takes it as its own copy of those values
            return copy.deepcopy(state, memo)
        if _shared(value):
            new[key] = value
            continue
        kind = type(value)
        found = memo.get(id(value), _MISSING)
        if found is not _MISSING:
            new[key] = found
        elif kind in _EMPTY_COPYABLE and not value:  # a module's hook dicts, mostly
            new[key] = memo[id(value)] = kind()
        elif key in _TENSOR_DICTS and kind in _DICTS and _all_in_memo(value, memo):
            tensors: dict[str, Any] = kind()
            memo[id(value)] = tensors
            for name, t in value.items():
                tensors[name] = None if t is None else memo[id(t)]
            new[key] = tensors
        elif key == "_modules" and kind in _DICTS and _all_modules(value):
            children: dict[str, Any] = kind()
            memo[id(value)] = children
            for name, m in value.items():
                children[name] = None if m is None else _deepcopy_module(m, memo)
            new[key] = children
        else:
            new[key] = copy.deepcopy(value, memo)
    return new


def _shared(value: Any) -> bool:
    """Whether `copy.deepcopy` returns `value` itself (an atomic value or a class)."""
    kind = type(value)
    return kind in _ATOMIC or issubclass(kind, type)


def _all_in_memo(tensors: dict[Any, Any], memo: dict[int, Any]) -> bool:
    return all(type(k) is str and (t is None or id(t) in memo) for k, t in tensors.items())


def _all_modules(children: dict[Any, Any]) -> bool:
    return all(
        type(k) is str and (m is None or isinstance(m, torch.nn.Module))
        for k, m in children.items()
    )


def _user_protocol(module: torch.nn.Module) -> Any:
    """`module` seen as its user's class: the copy protocol of the class the functional layer
    wraps (the next class after that layer in the MRO), or the module itself for a plain one."""
    original = _original_class(module)
    mro = type(module).__mro__
    if original is type(module):
        return module
    return super(mro[mro.index(original) - 1], module)


def slot_pairs(
    model: torch.nn.Module, tree: Tree | None = None
) -> list[tuple[torch.nn.Module, dict[str, int]]]:
    """Every place each weight of `model` occupies, resolved once: each module of the tree (in
    `modules()` order) with its parameter names mapped to the index of the weight in
    `model.parameters()`, so tied weights and shared submodules are one weight (`tree`: the
    model's walk, when known)."""
    tree = walk(model) if tree is None else tree
    index_of = {id(p): i for i, p in enumerate(tree.params)}
    pairs = []
    for m in tree.modules:
        places = {}
        for name, p in m._parameters.items():
            if p is None:
                continue
            if id(p) not in index_of:
                raise PatchError(
                    f"{type(m).__name__} holds a parameter {name!r} that the model's "
                    f"named_parameters() does not list ({type(model).__name__} lists its "
                    "parameters its own way): a functional model has one fast weight for each "
                    "parameter the model lists, and none for this one. List it in "
                    "named_parameters(), or make it a buffer (register_buffer) if it is not "
                    "trained"
                )
            places[name] = index_of[id(p)]
        pairs.append((m, places))
    return pairs
