"""A MAML script as users wrote it for higher 0.2.1 (2019-2020 era): it must run unchanged.

Sine-wave regression. Nothing here is adapted to the new library: same imports, same calls,
same idioms (copy_initial_weights=False, diffopt.step(loss), fnet.parameters(time=...),
track_higher_grads=False at test time, the optimizer state of the outer loop).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import higher


def sample_tasks(n_tasks, n_shots, generator):
    amp = torch.rand(n_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=generator) * math.pi
    x = torch.rand(n_tasks, 2 * n_shots, 1, generator=generator) * 10 - 5
    y = amp * torch.sin(x + phase)
    return x[:, :n_shots], y[:, :n_shots], x[:, n_shots:], y[:, n_shots:]


def train(net, meta_opt, generator, meta_steps=30, n_inner_iter=3):
    losses = []
    for _ in range(meta_steps):
        x_spt, y_spt, x_qry, y_qry = sample_tasks(3, 10, generator)
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        meta_opt.zero_grad()
        qry_losses = []
        for i in range(x_spt.size(0)):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (
                fnet,
                diffopt,
            ):
                for _ in range(n_inner_iter):
                    spt_loss = F.mse_loss(fnet(x_spt[i]), y_spt[i])
                    diffopt.step(spt_loss)
                qry_loss = F.mse_loss(fnet(x_qry[i]), y_qry[i])
                qry_losses.append(qry_loss.detach())
                qry_loss.backward()
                assert len(list(fnet.parameters(time=n_inner_iter))) == 6
        meta_opt.step()
        losses.append(torch.stack(qry_losses).mean().item())
    return losses


def test(net, generator):
    x_spt, y_spt, x_qry, y_qry = sample_tasks(20, 10, generator)
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    losses = []
    for i in range(x_spt.size(0)):
        with higher.innerloop_ctx(net, inner_opt, track_higher_grads=False) as (fnet, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fnet(x_spt[i]), y_spt[i]))
            losses.append(F.mse_loss(fnet(x_qry[i]), y_qry[i]).item())
    return sum(losses) / len(losses)


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    meta_opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = test(net, torch.Generator().manual_seed(1))
    losses = train(net, meta_opt, generator)
    after = test(net, torch.Generator().manual_seed(1))
    print(f"first {sum(losses[:5]) / 5:.4f} last {sum(losses[-5:]) / 5:.4f}")
    print(f"test before {before:.4f} after {after:.4f}")


if __name__ == "__main__":
    main()
