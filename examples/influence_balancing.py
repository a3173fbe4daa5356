"""Truncated backprop drives a parameter to the wrong value; persistent ES does not.

    python examples/influence_balancing.py          # full size: about two minutes on 2 cores
    python examples/influence_balancing.py --smoke  # seconds (CI)

The influence-balancing task of Tallec and Ollivier (UORO, 2017), reused by Vicol, Metz and
Sohl-Dickstein (PES, ICML 2021) among their experiments, as we remember the description (the
papers were not at hand; the system below is stated exactly, and its properties are computed
here, not taken from them). A scalar parameter θ drives a linear system whose state s has n = 23
dimensions:

    s_0 = 0,   s_{t+1} = A s_t + θ b,   L_t = 0.5 (s_t[0] - 1)^2,   total loss = Σ_{t=1..T} L_t

with A = 0.5 I + 0.5 J (J the shift: A[i, i] = 0.5, A[i, i+1] = 0.5, zero elsewhere) and
b = (+1 for the first p = 10 coordinates, -1 for the other 13). The coupling passes
coordinate i+1 into coordinate i one step later, so θ reaches s[0] at once through +1, the
positive influences, and only some 10-40 steps later through the negative ones, which are
more: in the long run s[0] -> 2 (p - (n - p)) θ = -6 θ. That is the property the task is
built on: the parameter's short-term influence on the loss has the opposite sign to its
long-term one, so an estimator that looks only a few steps back (truncated backprop through
K steps, truncated ES) gets the sign of the gradient wrong.

Everything is linear in θ, so the truth is in closed form: s_t[0] = c_t θ with c_t the
unroll of b, and the optimum of the total loss is θ* = Σ c_t / Σ c_t^2 (-0.1372 for T = 1000;
the transient at the start of each episode moves it from the steady state's -1/6). Truncated
backprop's gradient, averaged over an episode, is Σ_t (c_t θ - 1) d_t where d_t is s_t[0]'s
sensitivity within its truncation only; it vanishes at θ_K = Σ d_t / Σ c_t d_t, a stable
point for gradient descent only when Σ c_t d_t > 0. The script prints both for each K.

Meta-training: episodes of T = 1000 steps from s_0 = 0, cut into truncations of K steps; after
every truncation, plain SGD (learning rate 0.02 / T, i.e. 0.02 on the mean loss per step) steps
θ on that truncation's estimate from `higher.estimators`: `TruncatedBackprop` (K = 1, 10, 100,
and K = T: full backprop, the reference), `TruncatedES` and `PES` (same K; 100 particles in
antithetic pairs, sigma 0.01). θ starts at 0. The figure (examples/output/
influence_balancing.png, `--out` elsewhere) shows θ per episode and its distance to θ*; the
table gives the final θ of each method; a full-size run writes examples/results/
influence_balancing.json (`--results` elsewhere). A run that leaves |θ - θ*| > 100 is stopped
and marked diverged. `--smoke` (or HIGHER_EXAMPLES_SMOKE=1) runs a shorter problem in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm  # type: ignore[import-untyped]

import higher.estimators as est

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "output" / "influence_balancing.png"
DEFAULT_RESULTS = HERE / "results" / "influence_balancing.json"
DTYPE = torch.float64
DIVERGED = 100.0  # |θ - θ*| past which a run is stopped
METHODS = ("TruncatedBackprop", "TruncatedES", "PES")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=23, help="n, the state's dimension")
    parser.add_argument("--positive", type=int, default=10, help="p, positive influences")
    parser.add_argument("--steps", type=int, default=1000, help="T, steps per episode")
    parser.add_argument("--truncations", default="1,10,100", help="K values, comma-separated")
    parser.add_argument("--episodes", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.02, help="SGD lr on the mean step loss")
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--results", type=Path, default=None, help="JSON (full size: "
                        "examples/results/influence_balancing.json)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke or os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1":
        args.smoke, args.steps, args.truncations, args.episodes = True, 200, "1,10,50", 12
        args.particles = 40
    elif args.results is None:
        args.results = DEFAULT_RESULTS
    args.truncations = [int(k) for k in args.truncations.split(",")]
    if any(args.steps % k for k in args.truncations):
        parser.error(f"every truncation must divide --steps {args.steps}")
    return args


class Influence:
    """The linear system: `A`, `b`, the unroll the estimators run and the closed forms."""

    def __init__(self, dim: int, positive: int, steps: int) -> None:
        self.A = 0.5 * torch.eye(dim, dtype=DTYPE) + 0.5 * torch.diag(
            torch.ones(dim - 1, dtype=DTYPE), 1
        )
        self.b = torch.cat([torch.ones(positive), -torch.ones(dim - positive)]).to(DTYPE)
        self.steps = steps
        self.c = self._first_coordinate(torch.zeros(dim, dtype=DTYPE), steps, drive=True)
        # sensitivity of s[j][0] to θ through the last j steps only: the partial sums of (A^i b)[0]
        self.truncated = self._first_coordinate(self.b, steps, drive=False).cumsum(0)

    def _first_coordinate(self, s: Tensor, steps: int, *, drive: bool) -> Tensor:
        out = []
        for _ in range(steps):
            if drive:
                s = self.A @ s + self.b
                out.append(s[0])
            else:
                out.append(s[0])
                s = self.A @ s
        return torch.stack(out)

    def init(self, meta: list[Tensor]) -> Tensor:
        return torch.zeros(len(self.b), dtype=DTYPE)

    def unroll(self, meta: list[Tensor], s: Tensor, *, steps: int) -> tuple[Tensor, Tensor]:
        """`steps` steps of the system at θ = meta[0]; the new state and the sum of their losses."""
        total = torch.zeros((), dtype=DTYPE)
        for _ in range(steps):
            s = self.A @ s + self.b * meta[0]
            total = total + 0.5 * (s[0] - 1) ** 2
        return s, total

    def optimum(self) -> float:
        """θ* = argmin of the total loss Σ 0.5 (c_t θ - 1)^2."""
        return float(self.c.sum() / (self.c**2).sum())

    def gradient(self, theta: float) -> float:
        """The exact gradient of the total loss at θ."""
        return float(((self.c * theta - 1) * self.c).sum())

    def truncated_fixed_point(self, k: int) -> tuple[float, bool]:
        """Where truncated backprop through K steps stops on average, and whether gradient
        descent is drawn to that point (True) or pushed away from it (False)."""
        d = self.truncated[torch.arange(self.steps) % k]
        curvature = float((self.c * d).sum())
        return float(d.sum()) / curvature, curvature > 0


def estimator(name: str, system: Influence, args: argparse.Namespace) -> Any:
    if name == "TruncatedBackprop":
        return est.TruncatedBackprop(system.unroll, system.init)
    cls = est.PES if name == "PES" else est.TruncatedES
    return cls(system.unroll, system.init, particles=args.particles, sigma=args.sigma,
               seed=args.seed)  # fmt: skip


def meta_train(
    name: str, k: int, system: Influence, args: argparse.Namespace, theta_star: float
) -> dict[str, Any]:
    """Online meta-training of θ with one estimator: an SGD step after every truncation."""
    theta = torch.zeros((), dtype=DTYPE, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=args.lr / args.steps)
    estimate = estimator(name, system, args)
    trajectory, diverged = [0.0], False
    start = time.perf_counter()
    for _ in range(args.episodes):
        estimate.reset()
        for _ in range(args.steps // k):
            opt.zero_grad()
            estimate.step([theta], steps=k).to_grad([theta])
            opt.step()
        trajectory.append(theta.item())
        if not abs(trajectory[-1] - theta_star) < DIVERGED:
            diverged = True
            break
    tail = trajectory[-max(1, len(trajectory) // 4) :]
    return {
        "estimator": name,
        "K": k,
        "final_theta": trajectory[-1],
        "tail_mean": sum(tail) / len(tail),
        "diverged": diverged,
        "episodes_run": len(trajectory) - 1,
        "seconds": time.perf_counter() - start,
        "trajectory": trajectory,
    }


def label(name: str, k: int, steps: int) -> str:
    if name == "TruncatedBackprop" and k == steps:
        return "full backprop (K=T)"
    short = {"TruncatedBackprop": "TBPTT", "TruncatedES": "TES", "PES": "PES"}[name]
    return f"{short} K={k}"


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    system = Influence(args.dim, args.positive, args.steps)
    theta_star = system.optimum()
    fixed = {k: system.truncated_fixed_point(k) for k in args.truncations}
    steady = 1 / (2 * (2 * args.positive - args.dim))
    print(f"n={args.dim}, p={args.positive}, T={args.steps}: optimum of the total loss "
          f"θ* = {theta_star:.4f} (steady state alone: {steady:.4f})")  # fmt: skip
    for k, (point, stable) in fixed.items():
        where = "stable (it converges there)" if stable else "unstable (it is pushed away)"
        print(f"  truncated backprop K={k}: zero of its mean gradient at θ_K = {point:.4f}, "
              f"{where}")  # fmt: skip
    plan = [("TruncatedBackprop", args.steps)]
    plan += [(name, k) for name in METHODS for k in args.truncations]
    runs: dict[str, dict[str, Any]] = {}
    for name, k in tqdm(plan, desc="meta-training", unit="run"):
        runs[label(name, k, args.steps)] = meta_train(name, k, system, args, theta_star)
    print(f"\nθ after {args.episodes} episodes of {args.steps} steps (θ* = {theta_star:.4f}):")
    print("| method | final θ | mean of last quarter | |θ - θ*| | seconds |")
    print("|---|---|---|---|---|")
    for method, run in runs.items():
        final = "diverged" if run["diverged"] else f"{run['final_theta']:.4f}"
        tail = "-" if run["diverged"] else f"{run['tail_mean']:.4f}"
        distance = abs(run["final_theta"] - theta_star)
        print(f"| {method} | {final} | {tail} | {distance:.3g} | {run['seconds']:.1f} |")
    plot(runs, theta_star, fixed, args)
    print(f"saved {args.out}")
    if args.results is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "results", "threads")}
        result = {
            "command": "python examples/influence_balancing.py" + (" --smoke" * args.smoke),
            "config": config,
            "theta_star": theta_star,
            "steady_state_theta": steady,
            "truncated_fixed_points": {
                str(k): {"theta": point, "stable": stable} for k, (point, stable) in fixed.items()
            },
            "runs": runs,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.results}")


def plot(
    runs: dict[str, dict[str, Any]],
    theta_star: float,
    fixed: dict[int, tuple[float, bool]],
    args: argparse.Namespace,
) -> None:
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    styles = {"full": "k", "TBPTT": "tab:red", "TES": "tab:orange", "PES": "tab:blue"}
    dashes = ["-", "--", ":", "-."]
    for method, run in runs.items():
        family = method.split()[0]
        color = styles.get(family, "k")
        linestyle = dashes[args.truncations.index(run["K"]) % 4] if run["K"] in args.truncations \
            else "-"  # fmt: skip
        width = 3.5 if family == "TBPTT" else 1.5  # TES follows TBPTT: drawn over it
        look = {"color": color, "linestyle": linestyle, "linewidth": width, "label": method}
        xs = range(len(run["trajectory"]))
        left.plot(xs, run["trajectory"], **look)
        right.plot(xs, [max(abs(t - theta_star), 1e-9) for t in run["trajectory"]], **look)
    left.axhline(theta_star, color="green", linewidth=2, alpha=0.5, label="θ* (closed form)")
    for k, (point, stable) in fixed.items():
        if stable:
            left.axhline(point, color="grey", linewidth=1, linestyle=":")
            left.annotate(f"where TBPTT K={k} converges", (args.episodes, point), fontsize=7,
                          color="grey", textcoords="offset points", xytext=(-2, 3),
                          ha="right")  # fmt: skip
    left.set_ylim(theta_star - 0.5, theta_star + 0.8)
    left.set_xlabel(f"episode ({args.steps} steps each)")
    left.set_ylabel("θ")
    left.set_title("θ during meta-training (SGD after every truncation)")
    left.legend(fontsize=7, ncol=2)
    right.set_yscale("log")
    right.set_xlabel(f"episode ({args.steps} steps each)")
    right.set_ylabel("|θ - θ*|")
    right.set_title("distance to the optimum of the total loss")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
