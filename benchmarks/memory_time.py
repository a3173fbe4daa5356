"""Time of one meta-gradient, full vs recompute, in interleaved rounds in one process.

memory.py times each contender once, in its own worker, one after the other: on a shared
machine the load moves between them. This alternates the two modes on the conv MAML net of
memory.py (`mem-conv`), so that drift cancels, and prints the median of each and their ratio.

    python benchmarks/memory_time.py --steps 100 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import higher

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import Sizes, make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = make_problem("mem-conv", Sizes.smoke() if args.smoke else Sizes())
    xs, ys, xq, yq = problem.tasks[0]
    model = problem.model

    def meta_gradient(unroll: str, steps: int) -> list[torch.Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=problem.lr)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll=unroll) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(closure=lambda: F.cross_entropy(fmodel(xs), ys))
            meta_loss = F.cross_entropy(fmodel(xq), yq)
            return list(torch.autograd.grad(meta_loss, list(model.parameters())))

    modes = ["full", "recompute"]
    for mode in modes:
        meta_gradient(mode, 2)  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            start = time.perf_counter()
            meta_gradient(mode, args.steps)
            seconds[mode].append(time.perf_counter() - start)
            print(f"round {r + 1}: {mode:9} {seconds[mode][-1]:.2f} s", flush=True)
    full, recompute = (statistics.median(seconds[m]) for m in modes)
    print(f"median: full {full:.2f} s, recompute {recompute:.2f} s, ratio {recompute / full:.2f}")


if __name__ == "__main__":
    main()
