"""The buffers a functional module holds itself (running statistics), renewed before each
forward of a submodule in training mode: an in-place update (BatchNorm's running averages)
then writes a tensor of its own, never one that an earlier step saved for its backward (an
eval-mode step saves the statistics it read). Buffers swapped in by a caller for one call
(`torch.func.functional_call`) are the caller's: they are left alone."""

from __future__ import annotations

import torch

_HELD = "_higher_held"


_TREE = "_higher_holders"  # the modules of a tree that hold buffers, shared by its modules


def hold(module: torch.nn.Module, name: str, value: object) -> None:
    """Record `value`, just set as buffer `name` of `module`, as the module's own."""
    if isinstance(value, torch.Tensor):
        module.__dict__.setdefault(_HELD, {})[name] = value
        holders: list[torch.nn.Module] | None = module.__dict__.get(_TREE)
        if holders is not None and not any(m is module for m in holders):
            holders.append(module)


def hold_all(root: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> None:
    """Record every buffer of the tree under `root` as its own (when it is made), and which
    modules hold some, so that `renew` visits those only, not the whole tree each forward
    (`modules`: the tree's `root.modules()`, when known)."""
    holders: list[torch.nn.Module] = []
    for module in root.modules() if modules is None else modules:
        held = {k: b for k, b in module._buffers.items() if b is not None}
        module.__dict__[_HELD] = held
        module.__dict__[_TREE] = holders
        if held:
            holders.append(module)


def renew(root: torch.nn.Module) -> None:
    """Give each own buffer of a submodule in training mode a tensor of its own (a clone), so
    the forward about to run updates that one in place. Not inside a torch.func transform or
    a compiled trace: there the buffers are the transform's inputs."""
    holders: list[torch.nn.Module] | None = root.__dict__.get(_TREE)
    if holders is not None and not holders:  # a tree without buffers (most MLPs)
        return
    if torch._C._functorch.peek_interpreter_stack() is not None or _compiling():
        return
    for module in root.modules() if holders is None else holders:
        held: dict[str, torch.Tensor] | None = module.__dict__.get(_HELD)
        if not held or not module.training:
            continue
        slots = module._buffers
        for name, value in held.items():
            if slots.get(name) is value:
                slots[name] = held[name] = value.clone()


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False
