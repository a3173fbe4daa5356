"""Forward overhead of functional modules: plain module vs ours vs torch.func vs higher 0.2.1.

Contenders, interleaved round by round so machine drift cancels:
  plain            model(x)                                    (the floor)
  ours             fmodel(x)                                   (current fast weights)
  ours params=     fmodel(x, params=p)                         (new weights every call)
  functional_call  torch.func.functional_call(model, p, (x,))
  higher 0.2.1     its fmodel(x, params=p), in its own venv    (--legacy-python PYTHON)

Usage: python benchmarks/patch_overhead.py [--rounds 15] [--calls 200] [--legacy-python PY]
Prints a markdown table of median microseconds per forward and the ratio to the plain module.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

WORKER = Path(__file__).with_name("_legacy_patch_worker.py")


def build(workload: str) -> tuple[nn.Module, torch.Tensor]:
    """The same module and input, from a seed, in every process."""
    torch.manual_seed(0)
    if workload == "mlp":  # overhead-bound: 20 Linear blocks, width 64, batch 32
        layers: list[nn.Module] = []
        for _ in range(20):
            layers += [nn.Linear(64, 64), nn.ReLU()]
        return nn.Sequential(*layers), torch.randn(32, 64)
    if workload == "conv":  # a small conv net on 28x28 grey images, batch 16
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 5),
        )
        return net, torch.randn(16, 1, 28, 28)
    raise ValueError(f"unknown workload {workload!r}: expected 'mlp' or 'conv'")


WORKLOADS = ("mlp", "conv")


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """Mean seconds per call over `calls` calls (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def contenders(workload: str) -> dict[str, Callable[[], object]]:
    import higher.patch

    model, x = build(workload)
    fmodel = higher.patch.monkeypatch(model, track_higher_grads=False)
    params = [p.detach().clone() for p in model.parameters()]
    named = dict(zip([n for n, _ in model.named_parameters()], params))
    return {
        "plain": lambda: model(x),
        "ours": lambda: fmodel(x),
        "ours params=": lambda: fmodel(x, params=params),
        "functional_call": lambda: torch.func.functional_call(model, named, (x,)),
    }


class Legacy:
    """higher 0.2.1 timed in its own interpreter, one round per request."""

    def __init__(self, python: str, calls: int) -> None:
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(calls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.version = self._ask("version")

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"the higher 0.2.1 worker died answering {line!r}")
        return answer

    def round(self, workload: str) -> float:
        return float(self._ask(workload))

    def close(self) -> None:
        self._ask("quit")
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--legacy-python", help="a Python whose env has higher==0.2.1")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    legacy = Legacy(args.legacy_python, args.calls) if args.legacy_python else None
    runs = {w: contenders(w) for w in WORKLOADS}
    samples: dict[str, dict[str, list[float]]] = {w: {} for w in WORKLOADS}
    with torch.no_grad():
        for r in range(args.rounds):
            for workload, fns in runs.items():
                for name, fn in fns.items():
                    samples[workload].setdefault(name, []).append(time_calls(fn, args.calls))
                if legacy is not None:
                    samples[workload].setdefault("higher 0.2.1", []).append(legacy.round(workload))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    if legacy is not None:
        legacy.close()

    medians = {w: {n: statistics.median(v) for n, v in s.items()} for w, s in samples.items()}
    print(f"\ntorch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.calls} calls")
    if legacy is not None:
        print(f"higher 0.2.1 worker: {legacy.version}")
    names = list(next(iter(medians.values())))
    print("\n| contender | " + " | ".join(f"{w} µs | {w} ratio" for w in WORKLOADS) + " |")
    print("|---|" + "---:|---:|" * len(WORKLOADS))
    for name in names:
        cells = []
        for w in WORKLOADS:
            t = medians[w][name]
            cells += [f"{t * 1e6:.1f}", f"{t / medians[w]['plain']:.2f}×"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
