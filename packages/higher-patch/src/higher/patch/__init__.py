"""Functional (stateless) modules with fast weights and their history.

`monkeypatch(module)` copies a `torch.nn.Module` into a functional module: calling it with
`params=` runs the module's own forward with those weights, and the weights of every step stay
reachable (`fmodel.parameters(time=t)`), so gradients flow through a whole unrolled loop.

Examples:
    >>> import torch, higher.patch
    >>> net = torch.nn.Linear(2, 1)
    >>> fnet = higher.patch.monkeypatch(net)
    >>> w, b = fnet.parameters()
    >>> loss = fnet(torch.ones(1, 2), params=[w - 0.1, b]).sum()
"""

from higher.errors import HigherError as HigherError

from ._api import buffer_sync as buffer_sync
from ._api import make_functional as make_functional
from ._api import monkeypatch as monkeypatch
from ._api import write_back_buffers as write_back_buffers
from ._errors import PatchError as PatchError
from ._module import FunctionalModule as FunctionalModule

# 0.2.1 name of the functional module's base class, kept for code that imported it.
_MonkeyPatchBase = FunctionalModule

__all__ = [
    "monkeypatch",
    "make_functional",
    "buffer_sync",
    "write_back_buffers",
    "FunctionalModule",
    "PatchError",
    "HigherError",
]
