"""Warnings torch emits about itself while it traces or differentiates, which callers of this
library cannot act on: filtered where this library makes torch emit them."""

from __future__ import annotations

import warnings

# torch.compile and torch.func's forward mode use parts of torch (torch.jit.script, ...) that
# warn of their own deprecation: a DeprecationWarning up to torch 2.13, a FutureWarning after
_TORCH_DEPRECATED = r"`torch\.[\w.]+` is deprecated"


def ignore_torch_self_deprecation() -> None:
    """Inside `warnings.catch_warnings()`: ignore torch's warnings of its own deprecated parts."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", message=_TORCH_DEPRECATED, category=category)
