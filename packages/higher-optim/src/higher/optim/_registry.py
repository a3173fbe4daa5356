"""Which differentiable twin serves which torch optimizer: built-ins, `register_optim`, plugins.

Plugins are entry points of the group `higher.optimizers`: the entry point's NAME is the torch
optimizer's qualified name (`package.module.ClassName`), its VALUE the twin (`pkg.mod:DiffX`).
Only the entry points named after a type being resolved are ever loaded, once.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from typing import Any

import torch

from higher.errors import HigherWarning

from . import _twins as t
from ._base import DifferentiableOptimizer
from ._errors import ArgumentTypeError, PluginError, UnsupportedOptimizerError

GROUP = "higher.optimizers"

_NO_TWIN = {
    "LBFGS": "it re-evaluates the loss through a closure, which a differentiable unroll cannot do",
    "SparseAdam": "it needs sparse gradients, which torch cannot differentiate through",
}


class PluginWarning(HigherWarning):
    """A plugin claims a torch optimizer that has a built-in twin; the built-in is used.

    Examples:
        >>> import warnings, higher.optim
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("a plugin claims torch.optim.adam.Adam", higher.optim.PluginWarning)
        >>> [w.category.__name__ for w in seen]
        ['PluginWarning']
    """

    __module__ = "higher.optim"  # its public path, for tracebacks, pickle and the docs


def _builtins() -> dict[type[torch.optim.Optimizer], type[DifferentiableOptimizer]]:
    pairs: dict[str, type[DifferentiableOptimizer]] = {
        "SGD": t.DifferentiableSGD,
        "Adam": t.DifferentiableAdam,
        "AdamW": t.DifferentiableAdamW,
        "Adagrad": t.DifferentiableAdagrad,
        "Adadelta": t.DifferentiableAdadelta,
        "Adamax": t.DifferentiableAdamax,
        "ASGD": t.DifferentiableASGD,
        "RMSprop": t.DifferentiableRMSprop,
        "Rprop": t.DifferentiableRprop,
        "NAdam": t.DifferentiableNAdam,
        "RAdam": t.DifferentiableRAdam,
        "Adafactor": t.DifferentiableAdafactor,
    }
    return {
        getattr(torch.optim, name): twin
        for name, twin in pairs.items()
        if hasattr(torch.optim, name)  # Adafactor: torch 2.5 and later
    }


BUILTINS = _builtins()
_registered: dict[type[Any], type[DifferentiableOptimizer]] = {}


def qualified_name(cls: type[Any]) -> str:
    """`package.module.ClassName`: the entry-point name a plugin uses for a torch optimizer."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Make `diff_optim_type` the twin of `optim_type` (and of its subclasses).

    An explicit registration wins over a built-in and over plugins.

    Examples:
        >>> import torch, higher.optim
        >>> class MySGD(torch.optim.SGD): ...
        >>> higher.optim.register_optim(MySGD, higher.optim.DifferentiableSGD)
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise ArgumentTypeError(
            f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}"
        )
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise ArgumentTypeError(
            f"diff_optim_type must be a DifferentiableOptimizer subclass, got {diff_optim_type!r}"
        )
    _registered[optim_type] = diff_optim_type


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" (distribution {dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.name!r} = {ep.value!r}{where}"


@functools.cache
def _plugin_index() -> dict[str, tuple[importlib.metadata.EntryPoint, ...]]:
    """Entry points of the group by name: metadata only, no plugin is imported."""
    index: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        claims = index.setdefault(ep.name, [])
        if all(ep.value != other.value for other in claims):
            claims.append(ep)
    return {name: tuple(eps) for name, eps in index.items()}


@functools.cache
def _load_plugin(name: str) -> type[DifferentiableOptimizer] | None:
    claims = _plugin_index().get(name, ())
    if not claims:
        return None
    if len(claims) > 1:
        raise PluginError(
            f"{len(claims)} plugins claim the torch optimizer {name}: "
            + " and ".join(_describe(ep) for ep in claims)
            + "; uninstall all but one, or choose with higher.optim.register_optim"
        )
    (ep,) = claims
    try:
        twin = ep.load()
    except Exception as err:
        raise PluginError(
            f"the higher.optimizers plugin {_describe(ep)} failed to load: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not (isinstance(twin, type) and issubclass(twin, DifferentiableOptimizer)):
        raise PluginError(
            f"the higher.optimizers plugin {_describe(ep)} is {twin!r}, "
            "not a higher.optim.DifferentiableOptimizer subclass"
        )
    return twin


def clear_plugin_cache() -> None:
    """Forget discovered and loaded plugins (after installing one in a running process).

    Examples:
        >>> import higher.optim
        >>> higher.optim.clear_plugin_cache()
    """
    _plugin_index.cache_clear()
    _load_plugin.cache_clear()
    _warn_if_claimed.cache_clear()
    _warn_near_misses.cache_clear()


def twin_of(optim_type: type[Any]) -> type[DifferentiableOptimizer]:
    """The differentiable twin of a torch optimizer type, found along its MRO.

    For each class of the MRO, in order: a `register_optim` registration, a built-in, then a
    plugin named after the class. A plugin that claims a built-in is not used (PluginWarning).

    Examples:
        >>> import torch, higher.optim
        >>> higher.optim.twin_of(torch.optim.Adam).__name__
        'DifferentiableAdam'
    """
    for cls in optim_type.__mro__:
        if cls is torch.optim.Optimizer or cls is object:
            break
        if cls in _registered:
            return _registered[cls]
        if cls in BUILTINS:
            _warn_if_claimed(qualified_name(cls))
            return BUILTINS[cls]
        if cls.__name__ in _NO_TWIN and cls.__module__.startswith("torch.optim"):
            raise UnsupportedOptimizerError(
                f"Optimizer type {qualified_name(optim_type)} has no differentiable twin: "
                f"{_NO_TWIN[cls.__name__]}"
            )
        twin = _load_plugin(qualified_name(cls))
        if twin is not None:
            return twin
        _warn_near_misses(cls)
    raise UnsupportedOptimizerError(
        f"Optimizer type {qualified_name(optim_type)} not supported by higher yet: no built-in "
        "twin, registration or plugin. Write a DifferentiableOptimizer and call "
        "higher.optim.register_optim, or install a plugin (entry-point group "
        f"{GROUP!r} named {qualified_name(optim_type)!r})"
    )


@functools.cache
def _warn_near_misses(cls: type[Any]) -> None:
    """Warn of entry points that name `cls` by another path (`torch.optim.SGD` for
    `torch.optim.sgd.SGD`): they are not used, since a plugin is found by the exact name."""
    exact = qualified_name(cls)
    for name, claims in _plugin_index().items():
        module, _, attr = name.rpartition(".")
        if name == exact or attr != cls.__name__ or not module:
            continue
        try:  # the module the key names (the optimizer's, not the plugin's): safe to import
            named = getattr(importlib.import_module(module), attr, None)
        except Exception:  # a key naming nothing importable is no near miss
            continue
        if named is cls:
            for ep in claims:
                warnings.warn(
                    f"the higher.optimizers plugin {_describe(ep)} is not used: it names "
                    f"{exact} by another path; rename the entry point to {exact!r} (the "
                    "class's __module__ and __qualname__)",
                    PluginWarning,
                    stacklevel=4,
                )


@functools.cache
def _warn_if_claimed(name: str) -> None:
    for ep in _plugin_index().get(name, ()):
        warnings.warn(
            f"the higher.optimizers plugin {_describe(ep)} claims {name}, which "
            "has a built-in twin; the built-in is used (call higher.optim.register_optim to "
            "choose the plugin's twin explicitly)",
            PluginWarning,
            stacklevel=4,
        )
