"""Warnings torch emits about itself while it traces or differentiates, which callers of this
library cannot act on: filtered where this library makes torch emit them."""

from __future__ import annotations

import logging
import re
import warnings

# torch.compile and torch.func's forward mode use parts of torch (torch.jit.script, ...) that
# warn of their own deprecation: a DeprecationWarning up to torch 2.13, a FutureWarning after
_TORCH_DEPRECATED = r"`torch\.[\w.]+` is deprecated"


# torch.compile reads `.grad` of every input tensor while it traces; the weights of an unroll
# are not leaves, and torch warns of that read (an error under -W error).
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"
_TRACING = f"(?:{re.escape(_NON_LEAF_GRAD)}|{_TORCH_DEPRECATED})"


def ignore_tracing_warnings() -> None:
    """Inside `warnings.catch_warnings()`: ignore what torch.compile warns of while it traces
    a step (its read of a non-leaf weight's `.grad`, and torch's warnings of its own
    deprecated parts), in one filter: a compiled step installs it at every call."""
    warnings.filterwarnings("ignore", message=_TRACING, category=Warning)


def ignore_torch_self_deprecation() -> None:
    """Inside `warnings.catch_warnings()`: ignore torch's warnings of its own deprecated parts
    (one filter for both categories; a compiled step's call uses `ignore_tracing_warnings`)."""
    warnings.filterwarnings("ignore", message=_TORCH_DEPRECATED, category=Warning)


# Inductor's C++ wrapper (`cpp_wrapper=True`, the compiled meta-step's default on CPU) runs an op
# it has no C shim for through its proxy executor, which is exact, and logs this once per op and
# graph (torch 2.13): nothing a caller can act on.
_C_SHIM = re.compile(r"\S+ is missing a c-shim implementation, using proxy executor as fallback")
_INDUCTOR_IR_LOGGER = "torch._inductor.ir"


class _DropCShimNotice(logging.Filter):
    """Drops the log record of inductor's proxy-executor fallback, and no other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _C_SHIM.fullmatch(record.getMessage()) is None


_C_SHIM_FILTER = _DropCShimNotice()


def quiet_c_shim_notice() -> None:
    """Filter the one message inductor's C++ wrapper logs per graph for an op without a C shim
    (on the logger `torch._inductor.ir`; every other record passes). Installed once, when a
    meta-step compiles with the C++ wrapper: its backward graph compiles during the backward
    pass, outside any call of this library."""
    logger = logging.getLogger(_INDUCTOR_IR_LOGGER)
    if _C_SHIM_FILTER not in logger.filters:
        logger.addFilter(_C_SHIM_FILTER)
