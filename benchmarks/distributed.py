"""Time of one outer step of the digits MAML (examples/distributed_maml.py) on 1 and 2 processes.

One outer step is the example's `sharded_train_step`: zero the gradients, run this process's
share of the meta-batch (5 SGD steps per task, second order, the demo's CNN), average the
meta-gradients across processes (`higher.distributed.all_reduce_grads`), take the Adam step.
Each configuration is launched as fresh processes (gloo on the loopback, a TCPStore on
127.0.0.1): warm-up steps, then `--steps` timed steps, each started after a barrier so the ranks
start together; rank 0's wall time per step is the figure (it includes waiting for the slower
rank at the all-reduce). The configurations are interleaved round by round, so slow spells of a
shared machine fall on all of them, and the table reports the median over rounds of each
round's median step.

    python benchmarks/distributed.py --rounds 5 --steps 10 --meta-batch 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = {  # name: (processes, threads per process)
    "1 process, 1 thread": (1, 1),
    "2 processes, 1 thread each": (2, 1),
}
THREADS_ROW = {"1 process, 2 threads": (1, 2)}  # --threads-row: the cores used by threads instead


def worker(meta_batch: int, steps: int, warmup: int, threads: int) -> None:
    """One rank: time `steps` outer steps; rank 0 prints, as JSON, the seconds of each step and
    of the averaging in it (`all_reduce_grads`, waiting for the other rank included)."""
    sys.path.insert(0, str(EXAMPLES.parent))
    import higher.distributed
    from examples import distributed_maml, maml_digits

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = higher.distributed.world().rank
    cfg = maml_digits.Config(meta_batch=meta_batch)
    torch.manual_seed(cfg.seed)
    digits = maml_digits.load_classes()
    classes = [
        c
        for d in maml_digits.TRAIN_DIGITS
        for c in maml_digits.rotations_and_reflections(digits[d])
    ]
    sampler = maml_digits.TaskSampler(classes, cfg, seed=cfg.seed)
    model = maml_digits.make_model(cfg)
    meta_opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
    averaging: list[float] = []
    reduce = higher.distributed.all_reduce_grads

    def timed_reduce(*args: Any, **kwargs: Any) -> float:
        start = time.perf_counter()
        total = reduce(*args, **kwargs)
        averaging.append(time.perf_counter() - start)
        return total

    higher.distributed.all_reduce_grads = timed_reduce  # the example calls it
    seconds = []
    for step in range(warmup + steps):
        tasks = sampler.tasks(cfg.meta_batch)
        dist.barrier()
        start = time.perf_counter()
        distributed_maml.sharded_train_step(model, meta_opt, tasks, cfg)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"step": seconds, "averaging": averaging[warmup:]}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(procs: int, threads: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Run `procs` fresh worker processes; rank 0's seconds per outer step and averaging."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.update(WORLD_SIZE=str(procs), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--worker", "--threads", str(threads)]
    command += ["--meta-batch", str(args.meta_batch), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup)]
    running = [
        subprocess.Popen(
            command,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(procs)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in running]
    if any(p.returncode for p in running):
        raise SystemExit(f"a worker failed ({procs} processes, {threads} threads)")
    seconds: dict[str, list[float]] = json.loads(outputs[0])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed outer steps per launch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks per outer step")
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 steps, 2 tasks")
    parser.add_argument(
        "--threads-row",
        action="store_true",
        help="also 1 process with 2 intra-op threads (on a busy machine its spin-waits can cost "
        "far more than they save)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.meta_batch, args.steps, args.warmup, args.threads)
        return
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.meta_batch = 1, 2, 1, 2
    configs = {**CONFIGS, **(THREADS_ROW if args.threads_row else {})}
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    averaging: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (procs, threads) in configs.items():
            seconds = launch(procs, threads, args)
            median = statistics.median(seconds["step"])
            rounds[name].append(median)
            averaging[name].append(statistics.median(seconds["averaging"]))
            print(f"round {r + 1}/{args.rounds}  {name:26s} {1000 * median:8.1f} ms", flush=True)
    base = statistics.median(rounds["1 process, 1 thread"])
    print(
        f"\nOne outer step: {args.meta_batch} tasks of 5-way 5-shot digits, 5 SGD steps each, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; median over {args.rounds} rounds "
        f"of the median of {args.steps} steps\n"
    )
    print(
        "| configuration | ms per outer step | speed-up | of which averaging (ms) | rounds (ms) |"
    )
    print("|---|---|---|---|---|")
    for name, values in rounds.items():
        median = statistics.median(values)
        spread = ", ".join(f"{1000 * v:.0f}" for v in values)
        reduce_ms = 1000 * statistics.median(averaging[name])
        print(
            f"| {name} | {1000 * median:.1f} | {base / median:.2f}x | {reduce_ms:.2f} | {spread} |"
        )


if __name__ == "__main__":
    main()
