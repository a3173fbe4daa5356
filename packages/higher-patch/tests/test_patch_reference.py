"""Functional modules against an independent reference: torch.func.functional_call, float64.

For every module kind: forwards with arbitrary fast weights, meta-gradients through unrolled SGD
steps, and the evolution of buffers (running statistics) equal what `functional_call` gives on
the original module.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher.patch as hp

DT = torch.float64


class Tied(nn.Module):
    """Tied weights, a shared submodule, all buffer kinds, containers, a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.layers = nn.ModuleList([self.block, nn.Linear(4, 4), self.block])  # shared twice
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 7, bias=False), "b": nn.Linear(4, 2)})
        self.heads["a"].weight = self.embed.weight  # tied: one Parameter in two places
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("scale", torch.full((4,), 1.5))
        self.register_buffer("offset", torch.full((4,), 0.25), persistent=False)
        self.register_buffer("absent", None)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) * self.scale + self.offset + self.frozen
        for layer in self.layers:
            h = layer(h)
        out: torch.Tensor = h
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.features(tokens)
        # A parent reading a child's weight directly (as Transformer fast paths do).
        head_b: nn.Linear = self.heads["b"]  # type: ignore[assignment]
        direct = nn.functional.linear(h, head_b.weight) + head_b.bias
        return torch.cat([self.heads["a"](h), direct], dim=-1)


def _legacy_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated (Future- or UserWarning), still in use
        return nn.utils.weight_norm(nn.Linear(3, 4))


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 2)
    )


Case = tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]
CASES: dict[str, Case] = {
    "linear": (lambda: nn.Linear(3, 4), lambda: (torch.randn(5, 3),)),
    "conv+bn": (_conv_net, lambda: (torch.randn(4, 2, 5, 5),)),
    "conv-transpose": (lambda: nn.ConvTranspose2d(2, 3, 2), lambda: (torch.randn(2, 2, 4, 4),)),
    "embedding": (lambda: nn.Embedding(10, 3), lambda: (torch.randint(0, 10, (4, 2)),)),
    "bn-momentum-none": (lambda: nn.BatchNorm1d(3, momentum=None), lambda: (torch.randn(6, 3),)),
    "bn-no-running-stats": (
        lambda: nn.BatchNorm1d(3, track_running_stats=False),
        lambda: (torch.randn(6, 3),),
    ),
    "layernorm": (lambda: nn.LayerNorm(3), lambda: (torch.randn(4, 3),)),
    "rnn-tanh-2layer": (lambda: nn.RNN(3, 4, num_layers=2), lambda: (torch.randn(5, 2, 3),)),
    "lstm-bi-proj": (
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2),
        lambda: (torch.randn(4, 2, 3),),
    ),
    "gru-batch-first": (
        lambda: nn.GRU(3, 4, batch_first=True, bidirectional=True),
        lambda: (torch.randn(2, 5, 3),),
    ),
    "rnn-cell": (lambda: nn.RNNCell(3, 4), lambda: (torch.randn(2, 3),)),
    "lstm-cell": (lambda: nn.LSTMCell(3, 4), lambda: (torch.randn(2, 3),)),
    "gru-cell": (lambda: nn.GRUCell(3, 4), lambda: (torch.randn(2, 3),)),
    "mha": (
        lambda: nn.MultiheadAttention(4, 2),
        lambda: (torch.randn(3, 2, 4), torch.randn(5, 2, 4), torch.randn(5, 2, 4)),
    ),
    "mha-kdim": (
        lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True),
        lambda: (torch.randn(2, 3, 4), torch.randn(2, 6, 3), torch.randn(2, 6, 5)),
    ),
    "transformer-encoder": (
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
        lambda: (torch.randn(2, 3, 4),),
    ),
    "transformer-decoder": (
        lambda: nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, norm_first=True),
        lambda: (torch.randn(3, 2, 4), torch.randn(5, 2, 4)),
    ),
    "weight-norm": (
        lambda: nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)),
        lambda: (torch.randn(5, 3),),
    ),
    "spectral-norm": (
        lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)),
        lambda: (torch.randn(5, 3),),
    ),
    "orthogonal": (
        lambda: nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)),
        lambda: (torch.randn(5, 4),),
    ),
    "legacy-weight-norm": (_legacy_weight_norm, lambda: (torch.randn(5, 3),)),
    "tied-shared-buffers": (Tied, lambda: (torch.randint(0, 7, (3, 2)),)),
}


def _scalar(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        out = out[0]
    value: torch.Tensor = (out.to(DT) ** 2).mean() + out.to(DT).sin().sum()
    return value


def _make(name: str, train: bool) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    build, inputs = CASES[name]
    with torch.no_grad():
        model = build().to(DT).train(train)
    args = tuple(a.to(DT) if a.is_floating_point() else a for a in inputs())
    return model, args


def _perturbed(model: nn.Module, scale: float = 0.1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        p.detach() + scale * torch.randn(p.shape, generator=g, dtype=DT) for p in model.parameters()
    ]


def _reference_call(
    model: nn.Module, params: list[torch.Tensor], buffers: dict[str, torch.Tensor], args: Any
) -> Any:
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, {**dict(zip(names, params)), **buffers}, args)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_with_params_matches_functional_call(name: str, train: bool) -> None:
    model, args = _make(name, train)
    ref_buffers = _buffers(model)
    fmodel = hp.monkeypatch(model)
    for step in range(3):  # new weights each call; buffers evolve alongside
        params = _perturbed(model, 0.05 * (step + 1))
        got = fmodel(*args, params=params)
        want = _reference_call(model, params, ref_buffers, args)
        torch.testing.assert_close(_scalar(got), _scalar(want), rtol=1e-12, atol=1e-12)
    for (bname, fbuf), rbuf in zip(fmodel.named_buffers(), ref_buffers.values()):
        torch.testing.assert_close(fbuf, rbuf, rtol=1e-12, atol=1e-12, msg=bname)


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    # Fused CPU attention kernels have no double backward in torch: second order needs the
    # math kernel (chosen with torch.nn.attention from torch 2.3, the older switch before).
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        legacy = torch.backends.cuda.sdp_kernel  # type: ignore[attr-defined,unused-ignore]
        with legacy(enable_flash=False, enable_mem_efficient=False, enable_math=True):
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_meta_gradient_through_unrolled_sgd_matches_functional_call(name: str) -> None:
    model, args = _make(name, train=True)
    lr, steps = 0.1, 3

    def unroll(call: Callable[[list[torch.Tensor]], Any], p0: list[torch.Tensor]) -> torch.Tensor:
        params = p0
        for _ in range(steps):
            loss = _scalar(call(params))
            trainable = [p for p in params if p.requires_grad]
            grads = iter(torch.autograd.grad(loss, trainable, create_graph=True))
            params = [p - lr * next(grads) if p.requires_grad else p for p in params]
        return _scalar(call(params))

    fmodel = hp.monkeypatch(model)
    init = fmodel.init_fast_params
    ref_init = [p.detach().clone().requires_grad_(p.requires_grad) for p in model.parameters()]
    ref_buffers = _buffers(model)
    trainable = [i for i, p in enumerate(init) if p.requires_grad]
    with _double_backward_attention():
        ours = unroll(lambda ps: fmodel(*args, params=ps), init)
        want = unroll(lambda ps: _reference_call(model, ps, ref_buffers, args), ref_init)
        g_ours = torch.autograd.grad(ours, [init[i] for i in trainable])
        g_ref = torch.autograd.grad(want, [ref_init[i] for i in trainable])
    torch.testing.assert_close(ours, want, rtol=1e-11, atol=1e-12)
    for i, a, b in zip(trainable, g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=fmodel._higher_store.names[i])
    assert len(list(fmodel.parameters(time=steps))) == len(init)


@pytest.mark.parametrize("name", ["mha", "transformer-encoder", "tied-shared-buffers"])
def test_explicit_params_win_where_a_parent_reads_a_child_weight(name: str) -> None:
    model, args = _make(name, train=False)
    fmodel = hp.monkeypatch(model)
    params = _perturbed(model, 0.5)
    with torch.no_grad():
        got, plain = fmodel(*args, params=params), model(*args)
        want = _reference_call(model, params, _buffers(model), args)
    torch.testing.assert_close(_scalar(got), _scalar(want), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_scalar(got), _scalar(plain))


def test_transformer_eval_fast_path_uses_explicit_params() -> None:
    # The fused fast path runs in float32, eval mode, without grad: it reads weights directly.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    fmodel = hp.monkeypatch(encoder)
    x = torch.randn(2, 3, 8)
    params = [p.detach() + 0.3 * torch.randn_like(p) for p in encoder.parameters()]
    with torch.no_grad():
        got = fmodel(x, params=params)
        names = [n for n, _ in encoder.named_parameters()]
        want = functional_call(encoder, dict(zip(names, params)), (x,))
        plain = encoder(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 0.1
