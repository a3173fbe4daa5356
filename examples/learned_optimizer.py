"""Meta-train a learned optimizer with PES and with truncated backprop, and beat tuned Adam.

    python examples/learned_optimizer.py [--smoke] [--save-weights PATH] [--out PNG]

The optimizer is `higher_learned_opt.LearnedOptimizer` (examples/learned-optimizer/, installed
as a plugin): every coordinate of every parameter steps by a small MLP of its gradient, three
momenta (each over the root of a second moment, as in Adam), its value, the log of that root
and the step count. The MLP's 194 weights are the meta-parameters. Meta-training runs the
optimizer's differentiable twin through `higher.estimators.InnerProblem` (the engine's pure
step, the twin found through the plugin's entry point), with the weights as the hyperparameter
`"weights"`:

- PES (`higher.estimators.PES`): persistent evolution strategies over truncations, unbiased;
- truncated backprop (`higher.estimators.TruncatedBackprop`): the exact gradient of each
  truncation alone, biased towards greedy steps (the short-horizon bias).

The inner problems ("tasks") are small MLPs (one hidden layer of 16, 32 or 64 tanh or ReLU
units) trained from a random initialization for `horizon` steps on minibatches of 32 rows, on
data that packages ship: scikit-learn's digits, wine and breast-cancer sets (standardized, up to
512 random rows per task, 10 % of them given random labels so that no network fits them exactly,
cross-entropy) and a synthetic regression (a random teacher network plus noise, MSE). A task is
drawn from a seed: which rows, labels and minibatches, which initialization, width and
activation. The training loss is the loss on the task's whole training set. The meta-loss of a
truncation is the sum over its steps of `w_k log(training loss after step k)`, `w_k = 2k /
horizon` ramping up to the horizon (the end counts most, as in the evaluation); the log makes
each task's relative progress count, whatever its scale. The outer optimizer is Adam on the
weights, fed by `estimate.to_grad(meta)`, its learning rate decaying along a cosine. During
meta-training the weights are scored every few tasks on four validation tasks (seeds of their
own): the curve in the plot.

Evaluation is on held-out tasks (seeds never used in meta-training) at the training horizon:
the final training loss of each task, for the PES-trained and the truncated-backprop-trained
optimizer (run as the plain `torch.optim` optimizer), against Adam with a learning rate tuned
per task family on the log grid 1e-4, 3e-4, ..., 1 (the lr with the lowest mean log final loss
over that family's held-out tasks themselves: a tuning that favours Adam). The best lr of the
grid for each task alone is reported too.

A full run prints the table, saves the meta-training curves and the held-out loss curves to
examples/output/learned_optimizer.png (`--out` elsewhere) and writes
examples/results/learned_optimizer.md and .json; `--save-weights PATH` writes the PES-trained
weights (what the plugin ships as `pretrained.json`). Runs are seeded and deterministic.
`--smoke` (or the environment variable HIGHER_EXAMPLES_SMOKE=1) shrinks the run to seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from higher_learned_opt import LearnedOptimizer, init_weights, save_weights
from matplotlib.figure import Figure
from sklearn.datasets import load_breast_cancer, load_digits, load_wine  # type: ignore[import-untyped]
from torch import Tensor, nn
from tqdm import tqdm  # type: ignore[import-untyped]

import higher.estimators as est

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "output" / "learned_optimizer.png"
RESULTS = HERE / "results" / "learned_optimizer"  # .md and .json
FAMILIES = ("digits", "wine", "breast_cancer", "regression")
ADAM_GRID = tuple(round(10 ** (k / 2), 6) for k in range(-8, 1))  # 1e-4, 3.2e-4, ..., 1
HELD_OUT_SEED = 100_000  # held-out tasks' seeds start here; meta-training's are below
VALIDATION_SEED = 200_000  # the tasks that score the weights during meta-training


@dataclass(frozen=True)
class Config:
    """The size of a run; `--smoke` replaces the fields named in `SMOKE`."""

    horizon: int = 100  # inner steps of a task, in training and at evaluation
    truncation: int = 10  # inner steps per meta-gradient estimate
    pes_tasks: int = 500  # tasks (each `horizon // truncation` outer steps) for PES
    tbptt_tasks: int = 500  # as many as PES: the same number of outer steps
    particles: int = 16
    sigma: float = 0.03
    meta_lr: float = 3e-3
    hidden: int = 16  # the learned optimizer's MLP
    lr: float = 1e-3  # the LearnedOptimizer's lr (its own step size is learned)
    samples: int = 512  # rows per task (at most)
    batch: int = 32  # rows per step
    label_noise: float = 0.1  # the fraction of rows of a classification task given random labels
    held_out: int = 3  # held-out tasks per family
    grid: tuple[float, ...] = ADAM_GRID
    curve_points: int = 10  # validation scores per meta-training run
    seed: int = 0


SMOKE = {
    "horizon": 6, "truncation": 3, "pes_tasks": 1, "tbptt_tasks": 1, "particles": 4,
    "held_out": 1, "grid": (1e-2, 1e-1), "samples": 64, "batch": 8,
}  # fmt: skip


# ---- tasks -----------------------------------------------------------------------------------


class Task(NamedTuple):
    """One inner problem: a model to train from its initialization on (x, y) with `loss`, on
    the minibatch `x[batches[k]]` at step `k`."""

    name: str
    family: str
    x: Tensor
    y: Tensor
    batches: Tensor  # (horizon, batch) row indices
    classify: bool
    width: int
    activation: str
    init_seed: int

    def data(self, start: int, stop: int) -> tuple[Tensor, ...]:
        """Steps `start` to `stop` as `InnerProblem` data (step dimension first): each step's
        minibatch, the whole training set and the step's weight in the meta-loss."""
        rows = self.batches[start:stop]
        n, horizon = stop - start, len(self.batches)
        ramp = 2 * torch.arange(start + 1, stop + 1, dtype=self.x.dtype) / horizon
        whole = (self.x.expand(n, *self.x.shape), self.y.expand(n, *self.y.shape))
        return (self.x[rows], self.y[rows], *whole, ramp)

    def model(self) -> nn.Module:
        """The task's network at its (seeded) initialization."""
        torch.manual_seed(self.init_seed)
        act = nn.Tanh() if self.activation == "tanh" else nn.ReLU()
        out = int(self.y.max()) + 1 if self.classify else 1
        return nn.Sequential(nn.Linear(self.x.shape[1], self.width), act,
                             nn.Linear(self.width, out))  # fmt: skip

    def loss(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *_: Tensor) -> Tensor:
        """The loss on (x, y): cross-entropy, or MSE for the regression (the inner step's, on a
        minibatch; further arguments, the whole set, are the meta-loss's)."""
        out = model(x)
        return F.cross_entropy(out, y) if self.classify else F.mse_loss(out.squeeze(-1), y)

    def log_loss(self, model: Callable[[Tensor], Tensor], _x: Tensor, _y: Tensor, x: Tensor,
                 y: Tensor, weight: Tensor) -> Tensor:  # fmt: skip
        """The meta-loss of one step: the log of the loss on the whole training set after it,
        times the step's weight (it ramps up to the horizon: the end counts most)."""
        return weight * torch.log(self.loss(model, x, y))


def _standardize(x: Tensor) -> Tensor:
    std = x.std(dim=0)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))


def load_datasets() -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits, wine and breast-cancer sets, standardized (shipped: no download)."""
    out = {}
    for name, load in (("digits", load_digits), ("wine", load_wine),
                       ("breast_cancer", load_breast_cancer)):  # fmt: skip
        x, y = load(return_X_y=True)
        out[name] = (_standardize(torch.tensor(x, dtype=torch.float32)), torch.tensor(y))
    return out


def make_task(family: str, seed: int, data: dict[str, tuple[Tensor, Tensor]], cfg: Config) -> Task:
    """The task of `family` drawn from `seed`: its rows, initialization, width and activation."""
    gen = torch.Generator().manual_seed(seed * 7919 + FAMILIES.index(family))
    width = (16, 32, 64)[int(torch.randint(3, (), generator=gen))]
    activation = ("tanh", "relu")[int(torch.randint(2, (), generator=gen))]
    if family == "regression":
        dim = 10
        x = torch.randn(cfg.samples, dim, generator=gen)
        w1 = torch.randn(dim, 32, generator=gen) / math.sqrt(dim)
        w2 = torch.randn(32, generator=gen) / math.sqrt(32)
        y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(cfg.samples, generator=gen)
        y = (y - y.mean()) / y.std()
        classify = False
    else:
        xs, ys = data[family]
        rows = torch.randperm(len(xs), generator=gen)[: cfg.samples]
        x, y, classify = xs[rows], ys[rows].clone(), True
        # some labels drawn at random: no network fits them all in a few epochs (wine's 178
        # rows would otherwise be fit to a loss of exactly 0, which no optimizer can beat)
        noisy = torch.rand(len(y), generator=gen) < cfg.label_noise
        y[noisy] = torch.randint(int(ys.max()) + 1, (int(noisy.sum()),), generator=gen)
    init_seed = int(torch.randint(2**31 - 1, (), generator=gen))
    batches = torch.stack(
        [torch.randperm(len(x), generator=gen)[: cfg.batch] for _ in range(cfg.horizon)]
    )
    return Task(f"{family} #{seed}", family, x, y, batches, classify, width, activation, init_seed)


def training_tasks(
    data: dict[str, tuple[Tensor, Tensor]], cfg: Config, offset: int
) -> Callable[[int], Task]:
    """The `i`-th meta-training task: the families in turn, fresh seeds."""

    def task(i: int) -> Task:
        return make_task(FAMILIES[i % len(FAMILIES)], offset + i // len(FAMILIES), data, cfg)

    return task


def held_out_tasks(data: dict[str, tuple[Tensor, Tensor]], cfg: Config) -> list[Task]:
    """`cfg.held_out` tasks per family, from seeds meta-training never draws."""
    return [
        make_task(f, HELD_OUT_SEED + k, data, cfg) for f in FAMILIES for k in range(cfg.held_out)
    ]


def validation_tasks(data: dict[str, tuple[Tensor, Tensor]], cfg: Config) -> list[Task]:
    """One task per family that scores the weights during meta-training (no other use)."""
    return [make_task(f, VALIDATION_SEED, data, cfg) for f in FAMILIES]


# ---- meta-training ---------------------------------------------------------------------------


class MetaRun(NamedTuple):
    """What one estimator's meta-training gave: the weights, its meta-loss per task and its
    validation scores `(tasks done, score)`."""

    weights: Tensor
    meta_loss: list[float]
    validation: list[tuple[int, float]]
    seconds: float  # meta-training alone, not the validation


def meta_train(
    kind: str,
    task_of: Callable[[int], Task],
    n_tasks: int,
    cfg: Config,
    validate: Callable[[Tensor], float],
) -> MetaRun:
    """Meta-train the weights with `kind` ("pes" or "tbptt") over `n_tasks` tasks, each unrolled
    for `cfg.horizon` steps in truncations of `cfg.truncation`; one Adam step per truncation.
    `validate(weights)` scores them before the first task and every few tasks."""
    start, validating = time.perf_counter(), 0.0
    every = max(1, n_tasks // cfg.curve_points)
    meta = [init_weights(cfg.hidden, seed=cfg.seed)]
    outer = torch.optim.Adam(meta, lr=cfg.meta_lr)
    truncations = cfg.horizon // cfg.truncation
    # the meta-learning rate decays to a tenth along a cosine: the last weights are the result
    decay = torch.optim.lr_scheduler.LambdaLR(
        outer, lambda t: 0.1 + 0.45 * (1 + math.cos(math.pi * t / max(1, n_tasks * truncations)))
    )
    curve: list[float] = []
    scores: list[tuple[int, float]] = []
    label = {"pes": "meta-train (PES)", "tbptt": "meta-train (truncated backprop)"}[kind]
    bar = tqdm(range(n_tasks), desc=label, unit="task", leave=False)
    for i in bar:
        if i % every == 0:
            tic = time.perf_counter()
            scores.append((i, validate(meta[0].detach())))
            validating += time.perf_counter() - tic
        task = task_of(i)
        model = task.model()
        opt = LearnedOptimizer(model.parameters(), lr=cfg.lr, weights=meta[0].detach())
        problem = est.InnerProblem(model, opt, task.loss, hyper=("weights",),
                                   meta_loss_fn=task.log_loss)  # fmt: skip
        estimator: est.PES | est.TruncatedBackprop
        if kind == "pes":
            estimator = est.PES(problem.unroll, problem.init, particles=cfg.particles,
                                sigma=cfg.sigma, seed=cfg.seed * 1_000_003 + i)  # fmt: skip
        else:
            estimator = est.TruncatedBackprop(problem.unroll, problem.init)
        total = 0.0
        for j in range(truncations):
            batch = task.data(j * cfg.truncation, (j + 1) * cfg.truncation)
            estimate = estimator.step(meta, *batch)
            if not all(bool(torch.isfinite(g).all()) for g in estimate.grads):
                break  # a diverged unroll: no step from it
            outer.zero_grad()
            estimate.to_grad(meta)
            torch.nn.utils.clip_grad_norm_(meta, 10.0)
            outer.step()
            decay.step()
            total += float(estimate.loss)
        curve.append(total / (truncations * cfg.truncation))
        bar.set_postfix(validation=f"{scores[-1][1]:.3f}")
    weights = meta[0].detach().clone()
    tic = time.perf_counter()
    scores.append((n_tasks, validate(weights)))
    validating += time.perf_counter() - tic
    return MetaRun(weights, curve, scores, time.perf_counter() - start - validating)


# ---- evaluation ------------------------------------------------------------------------------


def train_curve(task: Task, make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                steps: int) -> list[float]:  # fmt: skip
    """The training loss before each step and after the last (`steps + 1` values)."""
    model = task.model()
    opt = make_opt(list(model.parameters()))
    losses = []
    for k in range(steps):
        with torch.no_grad():
            losses.append(task.loss(model, task.x, task.y).item())
        opt.zero_grad()
        rows = task.batches[k]
        task.loss(model, task.x[rows], task.y[rows]).backward()
        opt.step()
    with torch.no_grad():
        losses.append(task.loss(model, task.x, task.y).item())
    return [x if math.isfinite(x) else math.inf for x in losses]


class Evaluation(NamedTuple):
    """Held-out curves per task: the learned optimizers', Adam's at each lr of the grid."""

    learned: dict[str, list[list[float]]]  # "pes"/"tbptt" -> per task
    adam: list[list[list[float]]]  # per task, per grid lr
    family_lr: dict[str, float]


def adam(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """What makes Adam at `lr` for a model's parameters."""
    return lambda ps: torch.optim.Adam(ps, lr=lr)


def evaluate(tasks: Sequence[Task], weights: dict[str, Tensor], cfg: Config) -> Evaluation:
    """Train every held-out task with each learned optimizer and with Adam at every grid lr."""

    def learned_opt(w: Tensor) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        return lambda ps: LearnedOptimizer(ps, lr=cfg.lr, weights=w)

    learned = {}
    for kind, w in weights.items():
        bar = tqdm(tasks, desc=f"held-out ({kind})", unit="task", leave=False)
        learned[kind] = [train_curve(t, learned_opt(w), cfg.horizon) for t in bar]
    bar = tqdm(tasks, desc="held-out (Adam grid)", unit="task", leave=False)
    adams = [[train_curve(t, adam(lr), cfg.horizon) for lr in cfg.grid] for t in bar]
    family_lr = {}
    for family in FAMILIES:
        rows = [k for k, t in enumerate(tasks) if t.family == family]
        score = [sum(_log(adams[k][j][-1]) for k in rows) for j in range(len(cfg.grid))]
        family_lr[family] = cfg.grid[min(range(len(cfg.grid)), key=score.__getitem__)]
    return Evaluation(learned, adams, family_lr)


def score(tasks: Sequence[Task], weights: Tensor, cfg: Config) -> float:
    """The mean over `tasks` of the log final training loss with the learned optimizer."""

    def make(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return LearnedOptimizer(ps, lr=cfg.lr, weights=weights)

    return sum(_log(train_curve(t, make, cfg.horizon)[-1]) for t in tasks) / len(tasks)


def adam_score(tasks: Sequence[Task], cfg: Config) -> float:
    """`score`'s number for Adam, with the best lr of the grid for each task."""
    finals = [
        min(_log(train_curve(t, adam(lr), cfg.horizon)[-1]) for lr in cfg.grid) for t in tasks
    ]
    return sum(finals) / len(finals)


def _log(x: float) -> float:
    return math.log(max(x, 1e-12)) if x < math.inf else math.inf


class Row(NamedTuple):
    """One held-out task's final training losses."""

    task: str
    pes: float
    tbptt: float
    adam_tuned: float
    adam_lr: float
    adam_best: float
    adam_best_lr: float


def rows(tasks: Sequence[Task], ev: Evaluation, cfg: Config) -> list[Row]:
    out = []
    for k, t in enumerate(tasks):
        finals = [curve[-1] for curve in ev.adam[k]]
        best = min(range(len(finals)), key=finals.__getitem__)
        tuned_lr = ev.family_lr[t.family]
        out.append(Row(
            f"{t.name} ({t.width} {t.activation})", ev.learned["pes"][k][-1],
            ev.learned["tbptt"][k][-1], finals[cfg.grid.index(tuned_lr)], tuned_lr,
            finals[best], cfg.grid[best],
        ))  # fmt: skip
    return out


def table(result_rows: Sequence[Row]) -> str:
    """The Markdown table of final training losses."""
    lines = [
        "| held-out task | ours (PES) | ours (truncated backprop) | Adam, lr tuned per family "
        "| Adam, best lr for this task |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result_rows:
        lines.append(
            f"| {r.task} | {r.pes:.4g} | {r.tbptt:.4g} | {r.adam_tuned:.4g} (lr {r.adam_lr:g}) "
            f"| {r.adam_best:.4g} (lr {r.adam_best_lr:g}) |"
        )
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------


def plot(runs: dict[str, MetaRun], adam_validation: float, tasks: Sequence[Task],
         ev: Evaluation, cfg: Config, out: Path) -> None:  # fmt: skip
    """Meta-training curves (left) and held-out training-loss curves per family (right)."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 1 + len(FAMILIES))
    names = {"pes": "PES", "tbptt": "truncated backprop"}
    for k, (kind, run) in enumerate(runs.items()):
        done, values = zip(*run.validation)
        axes[0].plot(done, values, f"C{k}.-", label=f"ours ({names[kind]})")
    axes[0].axhline(adam_validation, color="C2", label="Adam, best grid lr per task")
    axes[0].set(
        title=f"meta-training: validation tasks at step {cfg.horizon}",
        xlabel="meta-training tasks",
        ylabel="mean log final training loss",
    )
    axes[0].title.set_fontsize("medium")
    axes[0].legend(fontsize="small")
    steps = list(range(cfg.horizon + 1))
    for ax, family in zip(axes[1:], FAMILIES):
        for k, t in enumerate(tasks):
            if t.family != family:
                continue
            first = k == next(j for j, u in enumerate(tasks) if u.family == family)
            j = cfg.grid.index(ev.family_lr[family])
            ax.plot(steps, ev.adam[k][j], "C2", label=f"Adam lr {cfg.grid[j]:g}" if first else None)
            for c, kind in enumerate(ev.learned):
                ax.plot(steps, ev.learned[kind][k], f"C{c}",
                        label=f"ours ({names[kind]})" if first else None)  # fmt: skip
        ax.set(title=f"held-out: {family}", xlabel="step", ylabel="training loss", yscale="log")
        ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, Path, Path | None, bool]:
    parser = argparse.ArgumentParser(description="Meta-train a learned optimizer; beat Adam.")
    parser.add_argument("--pes-tasks", type=int, default=Config.pes_tasks)
    parser.add_argument("--tbptt-tasks", type=int, default=Config.tbptt_tasks)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to save the PNG")
    parser.add_argument("--save-weights", type=Path, default=None,
                        help="write the PES-trained weights here (JSON)")  # fmt: skip
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1",
        help="a run of seconds, for CI (also: HIGHER_EXAMPLES_SMOKE=1)",
    )
    args = parser.parse_args(argv)
    cfg = Config(pes_tasks=args.pes_tasks, tbptt_tasks=args.tbptt_tasks, seed=args.seed)
    if args.smoke:
        cfg = dataclasses.replace(cfg, **SMOKE)  # type: ignore[arg-type]
    return cfg, args.out, args.save_weights, args.smoke


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out, save_to, smoke = parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they save
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    data = load_datasets()
    validation = validation_tasks(data, cfg)

    def validate(weights: Tensor) -> float:
        return score(validation, weights, cfg)

    runs = {
        "pes": meta_train("pes", training_tasks(data, cfg, 0), cfg.pes_tasks, cfg, validate),
        "tbptt": meta_train(
            "tbptt", training_tasks(data, cfg, 50_000), cfg.tbptt_tasks, cfg, validate
        ),
    }
    adam_validation = adam_score(validation, cfg)
    tasks = held_out_tasks(data, cfg)
    ev = evaluate(tasks, {k: r.weights for k, r in runs.items()}, cfg)
    result_rows = rows(tasks, ev, cfg)
    plot(runs, adam_validation, tasks, ev, cfg, out)
    seconds = time.perf_counter() - start
    text = table(result_rows)
    wins = sum(r.pes < r.adam_tuned for r in result_rows)
    print(text)
    print(
        f"\nours (PES) below tuned Adam on {wins} of {len(result_rows)} held-out tasks; "
        f"meta-training {runs['pes'].seconds:.0f} s (PES), {runs['tbptt'].seconds:.0f} s "
        f"(truncated backprop); {seconds:.0f} s in all. Plot saved to {out}"
    )
    info = {"estimator": "PES", "config": dataclasses.asdict(cfg), "torch": torch.__version__}
    if save_to is not None:
        save_weights(runs["pes"].weights, save_to, **info)
    if not smoke:
        record(cfg, result_rows, runs, adam_validation, seconds, argv)


def record(cfg: Config, result_rows: Sequence[Row], runs: dict[str, MetaRun],
           adam_validation: float, seconds: float, argv: Sequence[str] | None) -> None:  # fmt: skip
    """Write the table (examples/results/learned_optimizer.md) and its numbers (.json)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "examples/learned_optimizer.py", *args])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "seconds": round(seconds),
        "meta_training_seconds": {k: round(r.seconds) for k, r in runs.items()},
        "rows": [r._asdict() for r in result_rows],
        "validation": {k: r.validation for k, r in runs.items()},
        "validation_adam": adam_validation,
    }
    RESULTS.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    wins = sum(r.pes < r.adam_tuned for r in result_rows)
    grid = ", ".join(f"{g:g}" for g in cfg.grid)
    md = (
        f"# Learned optimizer against tuned Adam\n\n```console\n$ {command}\n```\n\n"
        f"Final training loss (on the task's whole training set) after {cfg.horizon} steps on "
        f"minibatches of {cfg.batch} rows, on each held-out task (seeds never used in "
        f"meta-training; every optimizer sees the same minibatches). Adam's lr is tuned per "
        f"task family on the grid {grid} by the mean log final loss over that family's "
        f"held-out tasks; the last column is the best grid lr for each task alone. "
        f"Ours below tuned Adam on {wins} of {len(result_rows)} tasks. Meta-training took "
        f"{runs['pes'].seconds:.0f} s with PES ({cfg.pes_tasks} tasks) and "
        f"{runs['tbptt'].seconds:.0f} s with truncated backprop ({cfg.tbptt_tasks} tasks); the "
        f"run {round(seconds)} s in all, torch {torch.__version__} on CPU.\n\n"
        f"{table(result_rows)}\n"
    )
    RESULTS.with_suffix(".md").write_text(md, encoding="utf-8")


if __name__ == "__main__":
    main()
