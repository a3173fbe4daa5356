"""Where one task of an eager inner loop goes: this project's `innerloop_ctx` against the
hand-written loop (the weights in the module's own slots, `torch.autograd.grad`, the update
written out: the floor of an eager library), on a workload of peers.py, in one process.

The two meta-steps alternate, so the machine's drift falls on both; each marks the end of a
task's phases (`_peers_common.Mark`): setup (`innerloop_ctx`'s enter; the hand loop's state
buffers), the first step, the later steps, the meta-gradient, and exit. The table gives µs per
task, the median over meta-steps, and the difference.

    python benchmarks/task_split.py --workload sine --meta-steps 30

With `--compiled` this project's steps are `higher.compile_step`'s (compiled before the first
measurement, as peers.py does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _peer_higher
import _peer_torchfunc
from _peers_common import Mark, MetaStep, Problem, Sizes, make_problem

PHASES = ("setup", "first step", "later steps", "meta-gradient", "exit")


def timed(build: Callable[[Problem, Mark], MetaStep], problem: Problem,
          into: dict[str, float]) -> Callable[[], None]:  # fmt: skip
    """A meta-step of `build`'s contender that adds each phase's seconds into `into`."""
    last = [0.0]

    def mark(phase: str) -> None:
        now = time.perf_counter()
        into[phase] += now - last[0]
        last[0] = now

    meta_step = build(problem, mark)

    def run() -> None:
        last[0] = time.perf_counter()
        meta_step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload", default="sine", choices=["sine", "sine-32", "long", "hpo", "long-adam"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--meta-steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 meta-steps")
    parser.add_argument(
        "--compiled", action="store_true", help="this project's steps by compile_step"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = make_problem(args.workload, Sizes.smoke() if args.smoke else Sizes())
    # what the contenders' workers read
    sys.argv = [sys.argv[0], "--threads", str(args.threads), *(["--compiled"] * args.compiled)]
    totals = {name: dict.fromkeys(PHASES, 0.0) for name in ("this project", "hand-written")}
    builds: dict[str, Callable[[Problem, Mark], MetaStep]] = {
        "this project": _peer_higher.build,
        "hand-written": lambda p, mark: _peer_torchfunc.build(p, slots=True, mark=mark),
    }
    contenders = {name: timed(build, problem, totals[name]) for name, build in builds.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PHASES} for n in totals}
    meta_steps = 3 if args.smoke else args.meta_steps
    for round_ in range(2 + meta_steps):  # two warm-up meta-steps each
        for name, run in contenders.items():
            totals[name].update(dict.fromkeys(PHASES, 0.0))
            run()
            if round_ >= 2:
                for phase in PHASES:
                    samples[name][phase].append(totals[name][phase] / len(problem.tasks))
    print(
        f"{args.workload}{' (compile_step)' * args.compiled}: {len(problem.tasks)} task(s) of "
        f"{problem.steps} steps, torch "
        f"{torch.__version__}, {args.threads} thread(s), {meta_steps} meta-steps"
    )
    print(f"{'µs per task':16} {'this project':>13} {'hand-written':>13} {'difference':>11}")
    for phase in (*PHASES, "all"):
        ours, hand = (
            statistics.median(
                sum(s[p][i] for p in PHASES) if phase == "all" else s[phase][i]
                for i in range(meta_steps)
            )
            * 1e6
            for s in samples.values()
        )
        print(f"{phase:16} {ours:13.0f} {hand:13.0f} {ours - hand:+11.0f}")


if __name__ == "__main__":
    main()
