"""Running statistics of a functional module: a forward in training mode updates new tensors,
never those an earlier forward saved for its backward; buffers a caller swaps in for one call
(`torch.func.functional_call`) are the caller's, updated in place as torch does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import higher.patch


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.5), nn.Linear(4, 1))
    return net.double()


def test_an_eval_forward_keeps_the_statistics_it_read_after_training_forwards() -> None:
    net = _net()
    fnet = higher.patch.monkeypatch(net, copy_initial_weights=False)
    x = torch.randn(8, 3, dtype=torch.float64) * 3 + 2
    mean = fnet.get_buffer("1.running_mean")
    var = fnet.get_buffer("1.running_var")
    first, bn, last = (net.get_submodule(k) for k in "012")
    assert isinstance(first, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
    assert isinstance(last, nn.Linear)
    want = F.batch_norm(first(x), mean.clone(), var.clone(), bn.weight, bn.bias, False)
    want_grad = torch.autograd.grad(F.linear(want, last.weight).sum(), first.weight)[0]

    fnet.eval()
    loss = fnet(x).sum()  # saves the statistics it read
    fnet.train()
    for _ in range(3):
        fnet(x + 1)  # the statistics move
    got_grad = torch.autograd.grad(loss, first.weight)[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=0)
    assert fnet.get_buffer("1.running_mean") is not mean  # new tensors hold the new values
    assert not torch.equal(fnet.get_buffer("1.running_mean"), mean)
    assert torch.equal(net.get_buffer("1.running_mean"), torch.zeros(4, dtype=torch.float64))


def test_buffers_a_caller_swaps_in_are_updated_in_place() -> None:
    fnet = higher.patch.monkeypatch(_net())
    own = fnet.get_buffer("1.running_mean")
    mine = {k: b.clone() for k, b in fnet.named_buffers()}
    given = mine["1.running_mean"]
    x = torch.randn(8, 3, dtype=torch.float64) + 5
    torch.func.functional_call(fnet, mine, (x,))
    assert given.abs().sum() > 0  # updated in place, as torch's own modules do
    assert fnet.get_buffer("1.running_mean") is own and torch.equal(own, torch.zeros(4).double())
