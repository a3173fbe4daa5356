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

# higher 0.2.1's private names that published code imports (not API: see _compat_021).
from ._compat_021 import _BufferType as _BufferType
from ._compat_021 import _EncapsulatorType as _EncapsulatorType
from ._compat_021 import _internal_attrs as _internal_attrs
from ._compat_021 import _make_functional as _make_functional
from ._compat_021 import _modify_internally as _modify_internally
from ._compat_021 import _MonkeyPatchBase as _MonkeyPatchBase
from ._compat_021 import _ParameterPlaceholder as _ParameterPlaceholder
from ._compat_021 import _patched_parameters as _patched_parameters
from ._compat_021 import _update_patched_params as _update_patched_params
from ._errors import PatchError as PatchError
from ._module import FunctionalModule as FunctionalModule

__all__ = [
    "monkeypatch",
    "make_functional",
    "buffer_sync",
    "write_back_buffers",
    "FunctionalModule",
    "PatchError",
    "HigherError",
]
