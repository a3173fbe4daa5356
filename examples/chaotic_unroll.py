"""Over a long unroll the exact hypergradient explodes; ES still gives a usable gradient.

    python examples/chaotic_unroll.py          # full size: about three minutes on 2 cores
    python examples/chaotic_unroll.py --smoke  # seconds (CI)

The inner problem: a small MLP (1-32-32-1, tanh, float64) fits y = sin(2x) on 64 points of
[-3, 3] by full-batch SGD from one fixed initialization, for T = 300 steps; the meta-loss is
the mean training loss over those steps, a function of the learning rate alone (the data and
the start are fixed: nothing is random). It runs through `higher.estimators.InnerProblem`
(the library's own pure step), with the meta-parameter log(lr). A run that diverges (a
non-finite loss) or whose mean loss passes 0.5 (what predicting 0 scores) counts as 0.5.

Below lr of about 0.07 the meta-loss is smooth. Above it, SGD runs at the edge of stability:
the loss oscillates, the trajectory is chaotic, and the meta-loss, as a function of lr, turns
into a rugged landscape whose exact derivative (backprop through all T steps, here
`torch.autograd.grad` through `problem.unroll`) jumps in sign and over orders of magnitude
between neighbouring learning rates: it is correct, and useless as a descent direction. ES
(`higher.estimators.es_gradient`: antithetic, 64 particles, sigma 0.05 in log(lr)) estimates
the gradient of the Gaussian-smoothed meta-loss instead: small, of a consistent sign, with a
standard error it reports.

The script evaluates both over a grid of learning rates (top panel: the meta-loss and ES's
smoothed loss; bottom: the two gradients on a symmetric log scale, ES with ±2 standard
errors), then meta-trains log(lr) with Adam (step 0.1) from lr = 0.02 on each gradient for
40 meta-iterations, and scores where each ends by its meta-loss and its smoothed meta-loss
(ES's mean loss over its perturbed runs there). It saves
examples/output/chaotic_unroll.png (`--out` elsewhere) and, at full size,
examples/results/chaotic_unroll.json (`--results` elsewhere). `--smoke` (or
HIGHER_EXAMPLES_SMOKE=1) shrinks it to seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
from torch import Tensor, nn
from tqdm import tqdm  # type: ignore[import-untyped]

import higher.estimators as est

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "output" / "chaotic_unroll.png"
DEFAULT_RESULTS = HERE / "results" / "chaotic_unroll.json"
DTYPE = torch.float64
CAP = 0.5  # the meta-loss of a diverged run: what predicting 0 scores on sin(2x)
SMOOTH_BELOW = 0.06  # learning rates below this: the smooth part of the landscape
CHAOTIC_ABOVE = 0.09  # and above this, the chaotic one (read off the full-size grid)
TICKS = [0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="T, inner SGD steps")
    parser.add_argument("--grid", type=int, default=40, help="learning rates on the grid")
    parser.add_argument("--lr-min", type=float, default=0.02)
    parser.add_argument("--lr-max", type=float, default=0.3)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.05, help="ES noise, in log(lr)")
    parser.add_argument("--meta-iters", type=int, default=40)
    parser.add_argument("--meta-lr", type=float, default=0.1, help="Adam's, on log(lr)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--results", type=Path, default=None, help="JSON (full size: "
                        "examples/results/chaotic_unroll.json)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke or os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1":
        args.smoke, args.steps, args.grid, args.particles, args.meta_iters = True, 120, 8, 8, 3
    elif args.results is None:
        args.results = DEFAULT_RESULTS
    return args


class Chaotic:
    """The inner problem as a meta-loss of log(lr): `meta_loss([log_lr])`."""

    def __init__(self, steps: int) -> None:
        torch.manual_seed(0)  # one fixed initialization for every learning rate
        model = nn.Sequential(
            nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        ).to(DTYPE)
        x = torch.linspace(-3, 3, 64, dtype=DTYPE).unsqueeze(1)
        self.x, self.y = x.expand(steps, 64, 1), torch.sin(2 * x).expand(steps, 64, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.problem = est.InnerProblem(model, opt, mse, hyper=("lr",))
        self.steps = steps

    def meta_loss(self, meta: list[Tensor]) -> Tensor:
        """The mean training loss over the T steps at lr = exp(meta[0]), capped at CAP."""
        lr = [meta[0].exp()]
        _, total = self.problem.unroll(lr, self.problem.init(lr), self.x, self.y)
        mean = total / self.steps
        capped: Tensor = torch.where(torch.isfinite(mean), mean.clamp(max=CAP), CAP)
        return capped

    def exact(self, log_lr: float) -> tuple[float, float, float]:
        """The meta-loss, its gradient by backprop through the whole unroll, and seconds."""
        start = time.perf_counter()
        meta = torch.tensor(log_lr, dtype=DTYPE, requires_grad=True)
        loss = self.meta_loss([meta])
        (grad,) = torch.autograd.grad(loss, [meta])
        return loss.item(), grad.item(), time.perf_counter() - start

    def es(self, log_lr: float, args: argparse.Namespace, seed: int) -> tuple[est.Estimate, float]:
        start = time.perf_counter()
        found = est.es_gradient(self.meta_loss, [torch.tensor(log_lr, dtype=DTYPE)],
                                particles=args.particles, sigma=args.sigma, seed=seed)  # fmt: skip
        return found, time.perf_counter() - start


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    prediction: Tensor = model(x)
    return ((prediction - y) ** 2).mean()


def landscape(problem: Chaotic, args: argparse.Namespace) -> list[dict[str, float]]:
    grid = torch.linspace(math.log(args.lr_min), math.log(args.lr_max), args.grid, dtype=DTYPE)
    rows = []
    for i, log_lr in enumerate(tqdm(grid.tolist(), desc="grid of learning rates", unit="lr")):
        loss, grad, exact_s = problem.exact(log_lr)
        found, es_s = problem.es(log_lr, args, seed=i)
        rows.append({
            "lr": math.exp(log_lr), "meta_loss": loss, "backprop_grad": grad,
            "es_grad": found.grads[0].item(), "es_stderr": found.stderr[0].item(),
            "es_smoothed_loss": found.loss.item(), "backprop_seconds": exact_s,
            "es_seconds": es_s,
        })  # fmt: skip
    return rows


def meta_train(problem: Chaotic, args: argparse.Namespace, how: str) -> list[dict[str, float]]:
    """Adam on log(lr) from lr = 0.02, on the exact gradient or on ES's."""
    log_lr = torch.tensor(math.log(0.02), dtype=DTYPE, requires_grad=True)
    opt = torch.optim.Adam([log_lr], lr=args.meta_lr)
    history = []
    for it in tqdm(range(args.meta_iters), desc=f"meta-training ({how})", unit="it"):
        loss, grad, _ = problem.exact(log_lr.item())
        if how == "ES":
            grad = problem.es(log_lr.item(), args, seed=10_000 + it)[0].grads[0].item()
        history.append({"lr": log_lr.exp().item(), "meta_loss": loss, "grad": grad})
        opt.zero_grad()
        log_lr.grad = torch.tensor(grad if math.isfinite(grad) else 0.0, dtype=DTYPE)
        opt.step()
    loss, _, _ = problem.exact(log_lr.item())
    smoothed = problem.es(log_lr.item(), args, seed=20_000)[0].loss.item()
    history.append({"lr": log_lr.exp().item(), "meta_loss": loss, "smoothed_loss": smoothed})
    return history


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """How much each gradient varies in the smooth and in the chaotic part of the grid."""

    def part(chosen: list[dict[str, float]]) -> dict[str, Any]:
        exact = [abs(r["backprop_grad"]) for r in chosen if math.isfinite(r["backprop_grad"])]
        es = [abs(r["es_grad"]) for r in chosen]
        signs = [math.copysign(1, r["backprop_grad"]) for r in chosen]
        return {
            "points": len(chosen),
            "backprop_abs_grad_min": min(exact, default=math.nan),
            "backprop_abs_grad_max": max(exact, default=math.nan),
            "backprop_sign_changes": sum(a != b for a, b in itertools.pairwise(signs)),
            "backprop_nonfinite": len(chosen) - len(exact),
            "es_abs_grad_max": max(es, default=math.nan),
            "es_stderr_median": sorted(r["es_stderr"] for r in chosen)[len(chosen) // 2]
            if chosen else math.nan,
        }  # fmt: skip

    smooth = [r for r in rows if r["lr"] < SMOOTH_BELOW]
    chaotic = [r for r in rows if r["lr"] > CHAOTIC_ABOVE and r["meta_loss"] < CAP]
    agree = [abs(r["es_grad"] - r["backprop_grad"]) / r["es_stderr"] for r in smooth]
    return {
        "smooth": part(smooth),
        "chaotic": part(chaotic),
        "smooth_es_minus_backprop_in_stderrs_max": max(agree, default=math.nan),
    }


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    problem = Chaotic(args.steps)
    start = time.perf_counter()
    rows = landscape(problem, args)
    runs = {how: meta_train(problem, args, how) for how in ("backprop", "ES")}
    found = summary(rows)
    print(f"meta-loss = mean training loss over {args.steps} SGD steps; gradients in log(lr)")
    print("| lr | meta-loss | backprop gradient | ES gradient ± stderr |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']:.4f} | {r['meta_loss']:.4f} | {r['backprop_grad']:+.3e} | "
              f"{r['es_grad']:+.3e} ± {r['es_stderr']:.1e} |")  # fmt: skip
    for name in ("smooth", "chaotic"):
        p = found[name]
        print(f"{name} part ({p['points']} learning rates): |backprop gradient| "
              f"{p['backprop_abs_grad_min']:.2e} .. {p['backprop_abs_grad_max']:.2e}, "
              f"{p['backprop_sign_changes']} sign changes; |ES gradient| <= "
              f"{p['es_abs_grad_max']:.2e}, median stderr {p['es_stderr_median']:.1e}")  # fmt: skip
    for how, history in runs.items():
        last = history[-1]
        print(f"meta-training on {how}: lr {history[0]['lr']:.3f} -> {last['lr']:.3f}, "
              f"meta-loss {history[0]['meta_loss']:.4f} -> {last['meta_loss']:.4f} (smoothed: "
              f"{last['smoothed_loss']:.4f})")  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s")
    plot(rows, runs, args)
    print(f"saved {args.out}")
    if args.results is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "results", "threads")}
        result = {
            "command": "python examples/chaotic_unroll.py",
            "config": config,
            "summary": found,
            "grid": rows,
            "meta_training": runs,
            "seconds": seconds,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.results}")


def plot(
    rows: list[dict[str, float]], runs: dict[str, list[dict[str, float]]], args: argparse.Namespace
) -> None:
    figure = Figure(figsize=(11, 7))
    top, right_top = figure.add_subplot(2, 2, 1), figure.add_subplot(2, 2, 2)
    bottom = figure.add_subplot(2, 1, 2)
    lrs = [r["lr"] for r in rows]
    top.plot(lrs, [r["meta_loss"] for r in rows], "k.-", label="meta-loss (exact)")
    top.plot(lrs, [r["es_smoothed_loss"] for r in rows], "-", color="tab:blue",
             label=f"ES: smoothed (sigma {args.sigma} in log lr)")  # fmt: skip
    for axes in (top, bottom):
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(FixedLocator(TICKS))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
    top.set_xlabel("learning rate")
    top.set_ylabel(f"mean training loss over {args.steps} steps")
    top.set_title("meta-loss landscape")
    top.legend(fontsize=8)
    bottom.plot(lrs, [r["backprop_grad"] for r in rows], "k.-", label="backprop (exact)")
    bottom.errorbar(lrs, [r["es_grad"] for r in rows], yerr=[2 * r["es_stderr"] for r in rows],
                    fmt="o-", color="tab:blue", markersize=3, capsize=2,
                    label=f"ES ({args.particles} particles) ± 2 stderr")  # fmt: skip
    bottom.set_yscale("symlog", linthresh=1e-3)
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_xlabel("learning rate")
    bottom.set_ylabel("d meta-loss / d log(lr)  (symlog)")
    bottom.set_title("gradient estimates over the same grid")
    bottom.legend(fontsize=8)
    for how, color in (("backprop", "k"), ("ES", "tab:blue")):
        history = runs[how]
        right_top.plot([h["lr"] for h in history], "o-", color=color, markersize=3,
                       label=f"Adam on {how}")  # fmt: skip
    right_top.set_yscale("log")
    right_top.set_xlabel("meta-iteration")
    right_top.set_ylabel("learning rate")
    right_top.set_title("meta-training log(lr)")
    right_top.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
