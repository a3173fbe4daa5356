# mypy: disable-error-code="union-attr,index,arg-type"
# (tests index Sequential models and read .grad, which torch types as Optional)
"""Inner loops under autocast, and a GradScaler on the outer loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher


def _maml_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device_type: str, dtype: torch.dtype
) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            with torch.autocast(device_type, dtype=dtype):
                loss = F.mse_loss(fmodel(x).float(), y)
            diffopt.step(loss)
        with torch.autocast(device_type, dtype=dtype):
            out = fmodel(x)
        assert out.dtype == dtype  # the forward really ran in low precision
        meta: torch.Tensor = F.mse_loss(out.float(), y)
        return meta


def _setup(device: str = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    return model, torch.randn(32, 4, device=device), torch.randn(32, 1, device=device)


def test_bf16_autocast_inner_loop_gives_float32_meta_gradients_close_to_fp32() -> None:
    model, x, y = _setup()
    _maml_step(model, x, y, "cpu", torch.bfloat16).backward()
    low = [p.grad.clone() for p in model.parameters()]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in low)
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
    for a, b in zip(low, model.parameters()):
        assert b.grad is not None
        # bf16 keeps ~3 significant digits: the direction must agree, the size roughly.
        cosine = F.cosine_similarity(a.flatten(), b.grad.flatten(), dim=0)
        assert cosine > 0.99, cosine
        assert 0.8 < a.norm() / b.grad.norm() < 1.25


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler: torch>=2.3")
def test_grad_scaler_on_the_outer_loop_gives_the_unscaled_meta_gradient() -> None:
    model, x, y = _setup()
    meta_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_maml_step(model, x, y, "cpu", torch.bfloat16)).backward()
    scaler.unscale_(meta_opt)
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(meta_opt)
    scaler.update()
    model.zero_grad()
    _maml_step(model, x, y, "cpu", torch.bfloat16).backward()
    for a, b in zip(scaled, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-3, atol=1e-6)
    assert scaler.get_scale() == 1024.0 * scaler.get_growth_factor() ** 0  # no inf found


@pytest.mark.cuda
def test_cuda_fp16_autocast_inner_loop_with_grad_scaler() -> None:
    model, x, y = _setup("cuda")
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.cuda.amp.GradScaler()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(_maml_step(model, x, y, "cuda", torch.float16)).backward()
    scaler.step(meta_opt)
    scaler.update()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
