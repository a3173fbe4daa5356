"""Bias, variance and cost of each gradient estimator, measured on the two examples.

    python examples/estimator_tradeoffs.py          # about a minute on 2 cores
    python examples/estimator_tradeoffs.py --smoke  # seconds (CI)

The numbers behind the choice between full backprop, truncated backprop, truncated ES, PES and
ES over a whole unroll:

- Influence balancing (examples/influence_balancing.py: n = 23, p = 10, T = 1000, at θ = 0):
  each estimator's estimate of the gradient of the total loss of one episode, the sum of its
  T / K truncations' estimates at a fixed θ, against the closed form. Over `--seeds` seeds:
  bias (mean - truth, and in units of the standard error of that mean), the spread over seeds,
  and the standard error the estimators report for the episode (`accumulated()`: the spread of
  each draw's sum over the truncations), the wall time and the number of unrolled steps of one
  episode's estimate.
- The chaotic unroll (examples/chaotic_unroll.py: T = 300 SGD steps of an MLP, gradient in
  log(lr)) at a smooth and at a chaotic learning rate: the exact gradient there and at nearby
  learning rates (within ±2 %), and ES over seeds (spread, reported stderr), with their costs.

Writes examples/results/estimator_tradeoffs.md (the tables, the command at the top) and .json
(`--out-dir` elsewhere; `--smoke` or HIGHER_EXAMPLES_SMOKE=1 shrinks it and writes nothing to
examples/results unless `--out-dir` is given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import higher.estimators as est

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the examples are its modules
from examples.chaotic_unroll import Chaotic
from examples.influence_balancing import Influence

HERE = Path(__file__).parent
DTYPE = torch.float64


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="T of influence balancing")
    parser.add_argument("--truncations", default="1,10,100")
    parser.add_argument("--theta", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--chaotic-steps", type=int, default=300)
    parser.add_argument("--chaotic-lrs", default="0.04,0.15")
    parser.add_argument("--chaotic-particles", type=int, default=64)
    parser.add_argument("--chaotic-seeds", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke or os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1":
        args.smoke, args.steps, args.truncations, args.seeds = True, 200, "1,10,50", 6
        args.particles, args.chaotic_steps, args.chaotic_particles = 20, 60, 8
        args.chaotic_seeds = 3
    elif args.out_dir is None:
        args.out_dir = HERE / "results"
    args.truncations = [int(k) for k in args.truncations.split(",")]
    args.chaotic_lrs = [float(lr) for lr in args.chaotic_lrs.split(",")]
    return args


def episode(estimator: Any, theta: float, k: int, steps: int) -> tuple[float, float, float]:
    """One episode's gradient estimate at a fixed θ (the sum of its truncations' estimates),
    its reported standard error (`accumulated()`), and the wall time."""
    meta = [torch.tensor(theta, dtype=DTYPE)]
    estimator.reset()
    start = time.perf_counter()
    for _ in range(steps // k):
        estimator.step(meta, steps=k)
    total = estimator.accumulated()
    seconds = time.perf_counter() - start
    return total.grads[0].item(), total.stderr[0].item(), seconds


def influence(args: argparse.Namespace) -> list[dict[str, Any]]:
    system = Influence(23, 10, args.steps)
    truth = system.gradient(args.theta)
    rows = []
    plan: list[tuple[str, int]] = [("backprop", args.steps)]
    plan += [("TruncatedBackprop", k) for k in args.truncations]
    plan += [(name, k) for name in ("TruncatedES", "PES") for k in args.truncations]
    plan += [("ES", args.steps)]
    for name, k in plan:
        seeds = 1 if name in ("backprop", "TruncatedBackprop") else args.seeds
        values, stderrs, seconds = [], [], []
        for seed in range(seeds):
            if name in ("backprop", "TruncatedBackprop"):
                estimator: Any = est.TruncatedBackprop(system.unroll, system.init)
            elif name == "ES":  # ES over the whole episode: PES with a single truncation
                estimator = est.PES(system.unroll, system.init, particles=args.particles,
                                    sigma=args.sigma, seed=seed)  # fmt: skip
            else:
                cls = est.PES if name == "PES" else est.TruncatedES
                estimator = cls(system.unroll, system.init, particles=args.particles,
                                sigma=args.sigma, seed=seed)  # fmt: skip
            value, stderr, wall = episode(estimator, args.theta, k, args.steps)
            values.append(value)
            stderrs.append(stderr)
            seconds.append(wall)
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        unrolled = {"backprop": args.steps, "TruncatedBackprop": args.steps,
                    "TruncatedES": (args.particles + 1) * args.steps}.get(name,
                    args.particles * args.steps)  # fmt: skip
        rows.append({
            "method": name, "K": k, "seeds": seeds, "truth": truth, "mean": mean,
            "bias": mean - truth,
            "bias_in_stderrs": (mean - truth) / (spread / math.sqrt(seeds)) if spread else None,
            "std_over_seeds": spread, "reported_stderr": statistics.fmean(stderrs),
            "seconds_per_estimate": statistics.median(seconds), "unrolled_steps": unrolled,
            "backward_steps": args.steps if "ackprop" in name else 0,
        })  # fmt: skip
    return rows


def chaotic(args: argparse.Namespace) -> list[dict[str, Any]]:
    problem = Chaotic(args.chaotic_steps)
    settings = argparse.Namespace(particles=args.chaotic_particles, sigma=0.05)
    rows = []
    for lr in args.chaotic_lrs:
        nearby = [math.log(lr * (1 + 0.005 * i)) for i in range(-4, 5)]
        exact = [problem.exact(log_lr) for log_lr in nearby]
        grads = [g for _, g, _ in exact]
        found = [problem.es(math.log(lr), settings, seed=s) for s in range(args.chaotic_seeds)]
        es = [f.grads[0].item() for f, _ in found]
        rows.append({
            "lr": lr, "meta_loss": exact[4][0], "backprop_grad": grads[4],
            "backprop_nearby_min": min(grads), "backprop_nearby_max": max(grads),
            "backprop_nearby_abs_ratio": max(map(abs, grads)) / max(min(map(abs, grads)), 1e-300),
            "backprop_seconds": statistics.median(s for _, _, s in exact),
            "es_mean": statistics.fmean(es), "es_std_over_seeds": statistics.stdev(es),
            "es_reported_stderr": statistics.fmean(f.stderr[0].item() for f, _ in found),
            "es_seconds": statistics.median(s for _, s in found),
            "es_unrolled_steps": args.chaotic_particles * args.chaotic_steps,
            "backprop_unrolled_steps": args.chaotic_steps,
        })  # fmt: skip
    return rows


def label(row: dict[str, Any], steps: int) -> str:
    if row["method"] == "backprop":
        return "full backprop (K=T)"
    if row["method"] == "ES":
        return "ES over the whole episode"
    return f"{row['method']} K={row['K']}"


def markdown(args: argparse.Namespace, ib: list[dict[str, Any]], ch: list[dict[str, Any]]) -> str:
    command = "python examples/estimator_tradeoffs.py" + (" --smoke" if args.smoke else "")
    truth = ib[0]["truth"]
    lines = [
        f"`{command}` (torch {torch.__version__}, CPU, {args.threads} thread)",
        "",
        f"## Influence balancing: gradient of one episode's total loss at θ = {args.theta}",
        "",
        f"T = {args.steps}, n = 23, p = 10; true gradient {truth:.2f} (closed form); ES-type "
        f"estimators: {args.particles} particles (antithetic), sigma {args.sigma}, "
        f"{args.seeds} seeds each. Reported stderr: the episode's, from `accumulated()` (the "
        "spread of each draw's sum over the truncations). Cost: one episode's estimate.",
        "",
        "| estimator | mean estimate | bias | bias / stderr of mean | std over seeds | "
        "reported stderr | ms per estimate | unrolled steps | backprop steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ib:
        z = "-" if r["bias_in_stderrs"] is None else f"{r['bias_in_stderrs']:+.1f}"
        lines.append(
            f"| {label(r, args.steps)} | {r['mean']:.2f} | {r['bias']:+.2f} | {z} | "
            f"{r['std_over_seeds']:.2f} | {r['reported_stderr']:.2f} | "
            f"{1e3 * r['seconds_per_estimate']:.0f} | {r['unrolled_steps']} | "
            f"{r['backward_steps']} |"
        )
    lines += [
        "",
        "PES's truncations share their particles, so their estimates are correlated: the "
        "episode's stderr is the spread of each draw's own sum (`accumulated()`), not the root "
        "of the sum of the truncations' squared stderrs. The cost excludes memory: backprop "
        "keeps K steps' graph, the ES family only the particles' states.",
        "",
        f"## Chaotic unroll: d meta-loss / d log(lr), T = {args.chaotic_steps} SGD steps",
        "",
        f"Backprop: the exact gradient at lr and at 8 learning rates within ±2 %; ES: "
        f"{args.chaotic_particles} particles, sigma 0.05 in log(lr), {args.chaotic_seeds} seeds.",
        "",
        "| lr | meta-loss | backprop at lr | backprop within ±2 % (min .. max) | "
        "ES mean | ES std over seeds | ES reported stderr | backprop ms | ES ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ch:
        lines.append(
            f"| {r['lr']} | {r['meta_loss']:.4f} | {r['backprop_grad']:+.3g} | "
            f"{r['backprop_nearby_min']:+.3g} .. {r['backprop_nearby_max']:+.3g} | "
            f"{r['es_mean']:+.3g} | {r['es_std_over_seeds']:.2g} | "
            f"{r['es_reported_stderr']:.2g} | {1e3 * r['backprop_seconds']:.0f} | "
            f"{1e3 * r['es_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ib = influence(args)
    ch = chaotic(args)
    table = markdown(args, ib, ch)
    print(table)
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "estimator_tradeoffs.md").write_text(table)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        result = {"config": config, "influence_balancing": ib, "chaotic": ch}
        (args.out_dir / "estimator_tradeoffs.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out_dir / 'estimator_tradeoffs.md'} and .json")


if __name__ == "__main__":
    main()
