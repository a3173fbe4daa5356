"""One walk over a module tree giving what `modules()`, `named_parameters()`, `buffers()` and
the copy engine's tensor scan give, each in its own order: a functional module is made from one
walk instead of one per question."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: the traversal methods whose `torch.nn.Module` versions the walk reproduces
_TRAVERSAL = (
    "modules",
    "named_modules",
    "children",
    "named_children",
    "parameters",
    "named_parameters",
    "buffers",
    "named_buffers",
    "_named_members",
    "__hash__",  # named_modules() keeps the modules it met in a set
    "__eq__",
)
_PLAIN: dict[type, bool] = {}


def _plain(cls: type) -> bool:
    """Whether `cls` traverses as `torch.nn.Module` does (overrides none of its methods)."""
    plain = _PLAIN.get(cls)
    if plain is None:
        base = torch.nn.Module
        plain = all(getattr(cls, name) is getattr(base, name) for name in _TRAVERSAL)
        _PLAIN[cls] = plain
    return plain


class Tree(NamedTuple):
    """A module tree as its own methods list it."""

    #: `root.modules()`: each module once, depth first, the root first
    modules: list[torch.nn.Module]
    #: `root.parameters()` and their names in `root.named_parameters()`
    params: list[torch.nn.Parameter]
    names: list[str]
    #: `root.buffers()`
    buffers: list[torch.Tensor]


def _visit(
    module: torch.nn.Module,
    prefix: str,
    seen: set[int],
    found: list[tuple[torch.nn.Module, str]],
) -> bool:
    """Add `module` and its submodules (depth first, each once) to `found` with their names;
    whether every one of them traverses as `torch.nn.Module` does. (A module-level function: a
    nested one that calls itself would be a reference cycle.)"""
    if id(module) in seen:
        return True
    seen.add(id(module))
    found.append((module, prefix))
    plain = _plain(type(module))
    for name, child in module._modules.items():
        if child is not None:
            plain = _visit(child, f"{prefix}.{name}" if prefix else name, seen, found) and plain
    return plain


def walk(root: torch.nn.Module) -> Tree:
    """The tree under `root`, in one walk where every module traverses as `torch.nn.Module`
    does; else from the module's own methods (a class may list its members its own way)."""
    found: list[tuple[torch.nn.Module, str]] = []
    plain = _visit(root, "", set(), found)
    modules = [m for m, _ in found]
    if not plain:
        named = list(root.named_parameters())
        return Tree(
            list(root.modules()), [p for _, p in named], [n for n, _ in named], list(root.buffers())
        )
    params: list[torch.nn.Parameter] = []
    names: list[str] = []
    buffers: list[torch.Tensor] = []
    kept: set[int] = set()
    for module, prefix in found:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in kept:
                kept.add(id(p))
                params.append(p)
                names.append(f"{prefix}.{name}" if prefix else name)
    kept.clear()
    for module in modules:
        for b in module._buffers.values():
            if b is not None and id(b) not in kept:
                kept.add(id(b))
                buffers.append(b)
    return Tree(modules, params, names, buffers)
