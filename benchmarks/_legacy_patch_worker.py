"""Worker for patch_overhead.py: times higher 0.2.1 in its own venv, one round per stdin line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from patch_overhead import WORKLOADS, build, time_calls


def main() -> None:
    import higher  # 0.2.1, installed in this interpreter's environment only

    calls = int(sys.argv[1])
    torch.set_num_threads(1)
    fns = {}
    for workload in WORKLOADS:
        model, x = build(workload)
        fmodel = higher.monkeypatch(model, track_higher_grads=False)
        params = [p.detach().clone() for p in model.parameters()]
        fns[workload] = functools.partial(fmodel, x, params=params)
    for line in sys.stdin:
        request = line.strip()
        if request == "quit":
            print("bye", flush=True)
            return
        if request == "version":
            print(f"torch {torch.__version__}", flush=True)
            continue
        with torch.no_grad():
            print(time_calls(fns[request], calls), flush=True)


if __name__ == "__main__":
    main()
