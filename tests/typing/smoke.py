"""Type-checked (mypy --strict) against the INSTALLED wheels: the public API is typed for users."""

from __future__ import annotations

import torch

import higher
import higher.patch

net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
fnet: higher.patch.FunctionalModule = higher.patch.monkeypatch(net, copy_initial_weights=False)
weights: list[torch.Tensor] = fnet.fast_params
fnet.fast_params = [w * 0.5 for w in weights]
first: list[torch.Tensor] = list(fnet.parameters(time=0))
named: dict[str, torch.Tensor] = fnet.named_fast_params()
out = fnet(torch.ones(2, 3), params=named)
higher.patch.buffer_sync(net, fnet)
fnet.write_back_buffers()
stateless = higher.patch.make_functional(net)
tracking: bool = fnet.track_higher_grads
version: str = higher.__version__
error: type[ValueError] = higher.patch.PatchError
