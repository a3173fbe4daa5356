"""Entry points: `monkeypatch`, `make_functional`, `buffer_sync`, `write_back_buffers`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._errors import PatchError
from ._module import FunctionalModule, buffer_owner, functional_tree
from ._walk import walk

Encapsulator = Callable[[FunctionalModule, torch.nn.Module], None]


def _device(device: object) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise PatchError(
            f"device must be a torch.device, a string or None, got {type(device).__name__}"
        )
    return torch.device(device)


def make_functional(
    module: torch.nn.Module, encapsulator: Encapsulator | None = None
) -> FunctionalModule:
    """Copy `module` into a stateless functional module: weights are passed to every call.

    Buffers are copied (cloned, detached). The module has no fast weights of its own until an
    `encapsulator(fmodule, module)` (or an assignment to `fast_params`) gives it some.

    Examples:
        >>> net = torch.nn.Linear(3, 1)
        >>> fnet = higher.patch.make_functional(net)
        >>> y = fnet(torch.ones(2, 3), params=[torch.zeros(1, 3), torch.ones(1)])
        >>> y.tolist()
        [[1.0], [1.0]]
    """
    fmodule = functional_tree(module, None, None)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def monkeypatch(
    module: torch.nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """Make a functional copy of `module` whose parameters are fast weights with a history.

    Args:
        module: the module to copy; it is never changed.
        device: where the fast weights and buffers live (default: where the module's do).
        copy_initial_weights: if True, the first fast weights are detached clones of the module's
            parameters (no gradient reaches them); if False, they are the parameters themselves,
            so a meta-loss's backward fills `module.parameters()`' `.grad` (the MAML setting).
        track_higher_grads: keep every step's fast weights (for higher-order gradients); if
            False only the current ones are kept, and with `copy_initial_weights=False` the
            gradient of a loss on them reaches `module.parameters()` as is (first-order MAML).

    Returns:
        The functional module, an instance of `type(module)` too.

    Examples:
        >>> net = torch.nn.Linear(3, 1)
        >>> fnet = higher.patch.monkeypatch(net)
        >>> isinstance(fnet, torch.nn.Linear), len(fnet.fast_params)
        (True, 2)
    """
    if not isinstance(copy_initial_weights, bool) or not isinstance(track_higher_grads, bool):
        raise PatchError("copy_initial_weights and track_higher_grads must be bools")
    dev = _device(device)
    if not isinstance(module, torch.nn.Module):
        raise PatchError(f"expected a torch.nn.Module to patch, got {type(module).__name__}")
    tree = walk(module)
    initial = []
    for p in tree.params:
        if copy_initial_weights:
            q = p.detach().to(dev, copy=True) if dev is not None else p.detach().clone()
            initial.append(q.requires_grad_(p.requires_grad))
        else:
            initial.append(p.to(dev) if dev is not None else p)
    anchor = None if copy_initial_weights else initial
    return functional_tree(module, initial, dev, track_higher_grads, anchor, tree)


def buffer_sync(
    module: torch.nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None
) -> None:
    """Copy every buffer of `module` into the functional module `fmodule` (cloned, detached).

    Examples:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fbn = higher.patch.monkeypatch(bn)
        >>> _ = bn(torch.randn(4, 2))  # the original's statistics move on
        >>> higher.patch.buffer_sync(bn, fbn)
        >>> torch.equal(fbn.running_mean, bn.running_mean)
        True
    """
    dev = _device(device)
    for qualname, buf in module.named_buffers():
        owner, name = buffer_owner(fmodule, qualname)
        if name not in owner._buffers:
            raise PatchError(f"the functional module has no buffer {qualname!r} to sync into")
        copied = buf.detach().to(dev, copy=True) if dev is not None else buf.detach().clone()
        setattr(owner, name, copied)  # held as the functional module's own


def write_back_buffers(fmodule: FunctionalModule, module: torch.nn.Module | None = None) -> None:
    """Copy the functional module's buffers (running statistics) back into the original module.

    Copied in place where shape and dtype agree, so the original keeps its tensor objects.

    Examples:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fbn = higher.patch.monkeypatch(bn)
        >>> _ = fbn(torch.randn(4, 2) + 3)  # only the copy's statistics move
        >>> higher.patch.write_back_buffers(fbn)
        >>> torch.equal(bn.running_mean, fbn.running_mean)
        True
    """
    fmodule.write_back_buffers(module)
