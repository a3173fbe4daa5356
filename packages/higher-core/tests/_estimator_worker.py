"""PES over the ranks of a gloo group, for test_core_estimators.py.

    python _estimator_worker.py --rank R --world-size W --store FILE --out DIR

`run` makes three PES estimates of a small float64 problem over truncations (6 particles: 3
antithetic pairs, so two ranks hold uneven shares) with a fixed seed, and three with a seed the
ranks agree on (rank 0's, broadcast). As a script it runs them on this rank's share of the
draws and saves them.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import higher.estimators as est

HANG_S = 240  # seconds: the launch has hung (it takes a few)


def unroll(
    meta: list[torch.Tensor], s: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One truncation of a contracting system driven by tanh(θ) and the data."""
    for k in range(x.shape[0]):
        s = 0.6 * s + torch.tanh(meta[0]) * x[k]
    return s, (s - 1).pow(2).sum()


def run(seed: int | None) -> list[list[torch.Tensor]]:
    """Three truncations' estimates: each as its gradients, standard errors and loss."""
    pes = est.PES(unroll, lambda m: torch.zeros(3, dtype=torch.float64), particles=6, sigma=0.1,
                  seed=seed)  # fmt: skip
    theta = [torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64)]
    x = torch.linspace(0.5, 1.5, 6, dtype=torch.float64).reshape(3, 2, 1).expand(3, 2, 3)
    out = []
    for t in range(3):
        e = pes.step(theta, x[t])
        out.append([*e.grads, *e.stderr, e.loss])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world-size"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(args.store).resolve()}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(args.rank)  # the unseeded run must take rank 0's seed, not its own
    results = {"seeded": run(4), "unseeded": run(None)}
    torch.save(results, Path(args.out) / f"rank{args.rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: it can hang after the last collective (torch 2.1)


if __name__ == "__main__":
    main()
