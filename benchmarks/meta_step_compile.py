"""Compile time of `higher.compile_meta_step` against the number of inner steps `k`.

Each measurement runs in a fresh process with an empty torch.compile cache of its own (cold),
then again in a second process on that cache (warm: what a user's next run pays): the seconds
of the first meta-step (tracing, compiling, running once) and the median of the next ones.
The workload is `long` of peers.py (MLP 8→32→32→1, SGD), one task, or `sine` with 8 tasks.

    python benchmarks/meta_step_compile.py --steps 1 10 100        # the table
    python benchmarks/meta_step_compile.py --smoke                 # k = 2, aot_eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import Sizes, make_problem


def worker(workload: str, steps: int, backend: str, threads: int, smoke: bool) -> None:
    import higher

    torch.set_num_threads(threads)
    sizes = Sizes.smoke() if smoke else Sizes()
    problem = make_problem(workload, sizes)
    model = problem.model
    opt = torch.optim.SGD(model.parameters(), lr=problem.lr)

    def loss(m: object, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
             yq: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return F.mse_loss(m(x), y)  # type: ignore[operator]

    def outer(m: object, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
              yq: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return F.mse_loss(m(xq), yq)  # type: ignore[operator]

    tasks = len(problem.tasks) if len(problem.tasks) > 1 else None
    batch = [torch.stack(parts) for parts in zip(*problem.tasks)]
    if tasks is None:
        batch = [b[0] for b in batch]
    meta = higher.compile_meta_step(loss, outer, steps=steps, tasks=tasks, backend=backend)
    params = list(model.parameters())

    def once() -> None:
        out = meta(model, opt, *batch)
        torch.autograd.grad(out.sum(), params)

    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        once()
        runs.append(time.perf_counter() - start)
    print(json.dumps({"first_s": first, "run_ms": statistics.median(runs) * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--workload", default="long", choices=["long", "sine"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="k = 2, aot_eager, tiny sizes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.workload, args.steps[0], args.backend, args.threads, args.smoke)
        return
    if args.smoke:
        args.steps, args.backend = [2], "aot_eager"
    print(f"workload {args.workload}, backend {args.backend}, {args.threads} threads, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"{'k':>5} {'cold first s':>13} {'warm first s':>13} {'meta-step ms':>13}")
    for steps in args.steps:
        with tempfile.TemporaryDirectory(prefix="higher-compile-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            command = [sys.executable, __file__, "--worker", "--steps", str(steps),
                       "--workload", args.workload, "--backend", args.backend,
                       "--threads", str(args.threads)]  # fmt: skip
            command += ["--smoke"] if args.smoke else []
            results = []
            for _ in range(2):  # cold, then warm on the cache the first left
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        cold, warm = results
        print(f"{steps:>5} {cold['first_s']:>13.1f} {warm['first_s']:>13.1f} "
              f"{warm['run_ms']:>13.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
