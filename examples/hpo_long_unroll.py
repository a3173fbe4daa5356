"""Learn per-layer learning rates through an 800-step training run, in a fraction of the memory.

    python examples/hpo_long_unroll.py                  # recompute mode (the default)
    python examples/hpo_long_unroll.py --unroll full    # every step's graph kept: 10+ GiB
    python examples/hpo_long_unroll.py --measure        # both modes' peak memory, then exit
    python examples/hpo_long_unroll.py --smoke          # seconds (CI)

Gradient-based hyperparameter optimization: a small CNN is trained from scratch with SGD
(momentum 0.9) for `--steps` steps on scikit-learn's handwritten digits (shipped with it:
nothing is downloaded), one learning rate per parameter tensor; the validation loss after
the last step is differentiated with respect to those learning rates, through all the steps,
and Adam updates their logarithms. A meta-iteration is one such training run. They start at
0.003, too small for the run to converge, so there is something to learn.

Through 800 steps, keeping every step's graph (`unroll="full"`, what higher 0.2.1 and TorchOpt
do) needs more than 8 GiB; `unroll="recompute"` rebuilds each step during the backward pass from
the weights and optimizer state it kept, for the same hypergradient (to float round-off) in a
few hundred MiB and about one more forward and gradient per step. The inner loop changes in one
argument, and in how it gives the loss: as a closure (the mode calls it again later, so each
closure binds its batch through its arguments).

`--measure` prints the peak memory held by tensors of one meta-gradient in both modes at a few
short unrolls and extrapolates to `--steps` from the per-step slope (measured with
benchmarks/_peers_common.tensor_peak, which counts every storage torch makes until it is freed).
The run saves the validation loss per meta-iteration and the learned learning rates to
examples/output/hpo_long_unroll.png (`--out` elsewhere). `--smoke` (or the environment variable
HIGHER_EXAMPLES_SMOKE=1) shrinks everything to seconds.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import Tensor, nn
from tqdm import tqdm  # type: ignore[import-untyped]

import higher

DEFAULT_OUT = Path(__file__).parent / "output" / "hpo_long_unroll.png"
INITIAL_LR = 0.003  # too small for 800 steps: there is something to learn
BUDGET_GIB = 8.0


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unroll", choices=["recompute", "full"], default="recompute")
    parser.add_argument("--steps", type=int, default=800, help="SGD steps per training run")
    parser.add_argument("--meta-iters", type=int, default=6, help="training runs")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--measure", action="store_true", help="peak memory of both modes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.smoke or os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1":
        args.smoke, args.steps, args.meta_iters, args.channels, args.batch = True, 4, 2, 4, 16
    return args


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and validation images (N, 1, 8, 8), standardized, and their labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1200], order[1200:]
    return x[train], y[train], x[val], y[val]


def network(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 16, 10),
    )


def batch_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """A step's loss as a closure, its batch bound by the arguments."""
    return lambda: F.cross_entropy(model(x), y)


def hypergradient(
    args: argparse.Namespace,
    log_lrs: list[Tensor],
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    run: int,
    unroll: str,
    steps: int,
) -> tuple[float, list[Tensor]]:
    """Train a fresh network for `steps` steps with lr = exp(log_lrs); the validation loss
    after them and its gradient with respect to `log_lrs`."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(run)  # a fresh initialization per training run
    model = network(args.channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lrs = [log_lr.exp() for log_lr in log_lrs]
    draw = torch.Generator().manual_seed(1000 + run)
    with higher.innerloop_ctx(model, opt, override={"lr": [lrs]}, unroll=unroll) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            pick = torch.randint(len(y_train), (args.batch,), generator=draw)
            diffopt.step(closure=batch_loss(fmodel, x_train[pick], y_train[pick]))
        fmodel.eval()  # validate with the running statistics the training run gathered
        val_loss = F.cross_entropy(fmodel(x_val), y_val)
        grads = torch.autograd.grad(val_loss, log_lrs)
    return val_loss.item(), list(grads)


def measure(args: argparse.Namespace, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    """Peak tensor memory of one hypergradient in both modes, extrapolated to args.steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _peers_common import tensor_peak

    log_lrs = initial_log_lrs(args)
    ks = [2, 4] if args.smoke else [20, 40]
    print(f"peak MiB held by tensors during one hypergradient ({args.channels} channels, batch "
          f"{args.batch}); the last column extrapolates to {args.steps} steps")  # fmt: skip
    for unroll in ("full", "recompute"):
        peaks = []
        for k in ks:
            run = functools.partial(hypergradient, args, log_lrs, data, 0, unroll, k)

            def grads(run: Callable[[], tuple[float, list[Tensor]]] = run) -> list[Tensor]:
                return run()[1]

            peak, _ = tensor_peak(grads)
            peaks.append(peak)
        slope = (peaks[1] - peaks[0]) / (ks[1] - ks[0])
        at_steps = peaks[1] + slope * (args.steps - ks[1])
        fits = "fits" if at_steps / 1024 < BUDGET_GIB else "does not fit"
        measured = ", ".join(f"k={k}: {p:.0f}" for k, p in zip(ks, peaks))
        print(f"  {unroll:9} {measured}; {slope:.2f} MiB/step -> {at_steps / 1024:.2f} GiB at "
              f"k={args.steps} ({fits} in {BUDGET_GIB:.0f} GiB)")  # fmt: skip


def initial_log_lrs(args: argparse.Namespace) -> list[Tensor]:
    count = len(list(network(args.channels).parameters()))
    return [torch.tensor(math.log(INITIAL_LR), requires_grad=True) for _ in range(count)]


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    data = digits()
    if args.measure:
        measure(args, data)
        return
    log_lrs = initial_log_lrs(args)
    names = [name for name, _ in network(args.channels).named_parameters()]
    meta_opt = torch.optim.Adam(log_lrs, lr=0.2)
    history: list[float] = []
    bar = tqdm(range(args.meta_iters), desc=f"training runs ({args.unroll})", unit="run")
    for run in bar:
        val_loss, grads = hypergradient(args, log_lrs, data, run, args.unroll, args.steps)
        history.append(val_loss)
        meta_opt.zero_grad()
        for log_lr, g in zip(log_lrs, grads):
            log_lr.grad = g
        meta_opt.step()
        bar.set_postfix(val_loss=f"{val_loss:.3f}")
    learned = [log_lr.exp().item() for log_lr in log_lrs]
    print(f"validation loss after {args.steps} steps: {history[0]:.4f} (first run, every lr "
          f"{INITIAL_LR}) -> {history[-1]:.4f} (run {len(history)})")  # fmt: skip
    for name, lr in zip(names, learned):
        print(f"  lr[{name}] = {lr:.4f}")
    plot(history, names, learned, args)
    print(f"saved {args.out}")


def plot(
    history: list[float], names: list[str], lrs: list[float], args: argparse.Namespace
) -> None:
    figure = Figure(figsize=(9, 3.6))
    left, right = figure.subplots(1, 2)
    left.plot(range(1, len(history) + 1), history, "o-")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("training run (meta-iteration)")
    left.set_ylabel(f"validation loss after {args.steps} steps")
    left.set_title(f"unroll={args.unroll!r}")
    right.barh(names, lrs)
    right.axvline(INITIAL_LR, color="grey", linestyle=":", label="initial lr")
    right.set_xlabel("learned learning rate")
    right.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
