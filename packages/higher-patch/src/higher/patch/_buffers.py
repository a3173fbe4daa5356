"""The buffers a functional module holds itself (running statistics), renewed before each
forward of a submodule in training mode: an in-place update (BatchNorm's running averages)
then writes a tensor of its own, never one that an earlier step saved for its backward (an
eval-mode step saves the statistics it read). Buffers swapped in by a caller for one call
(`torch.func.functional_call`) are the caller's: they are left alone."""

from __future__ import annotations

import torch

_HELD = "_higher_held"


def hold(module: torch.nn.Module, name: str, value: object) -> None:
    """Record `value`, just set as buffer `name` of `module`, as the module's own."""
    if isinstance(value, torch.Tensor):
        module.__dict__.setdefault(_HELD, {})[name] = value


def hold_all(root: torch.nn.Module) -> None:
    """Record every buffer of the tree under `root` as its own (when it is made)."""
    for module in root.modules():
        module.__dict__[_HELD] = {k: b for k, b in module._buffers.items() if b is not None}


def renew(root: torch.nn.Module) -> None:
    """Give each own buffer of a submodule in training mode a tensor of its own (a clone), so
    the forward about to run updates that one in place. Not inside a torch.func transform or
    a compiled trace: there the buffers are the transform's inputs."""
    if torch._C._functorch.peek_interpreter_stack() is not None or _compiling():
        return
    for module in root.modules():
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
