"""Few-shot learning with MAML on scikit-learn's handwritten digits, in one command.

    nox -s demo                          # or: python examples/maml_digits.py [--smoke] [--shots 1]

MAML (Finn et al., 2017) learns an *initialization* from which a few steps of plain SGD on a
handful of labelled images give a good classifier for classes never seen in training. Learning it
means differentiating through those SGD steps: `higher.innerloop_ctx` unrolls them on fast weights,
and the backward pass of the loss after the last step reaches the model's own parameters.

The data is `sklearn.datasets.load_digits` (1797 images of 8x8 pixels, digits 0-9), which
scikit-learn ships, so nothing is downloaded. A task is 5-way k-shot: 5 classes, relabelled 0-4
in random order, with k support images per class to adapt on and 15 query images per class to
score on.

- Meta-testing uses the held-out digits 5-9. With only 5 of them, every test task has the same
  5 digits: what changes from task to task is the label permutation and which images form the
  support and query sets. That is the standard protocol for so few classes, and the permutation
  means no fixed classifier can beat chance: the model has to learn from the support set.
- Meta-training uses the digits 0-4 only, each in its 8 rotations and reflections, taken as
  40 classes of their own (as is usual for Omniglot). Five classes are too few tasks: on the
  plain digits 0-4, MAML learns features for those five alone and ends up *below* the baseline
  on the held-out digits.

The baseline is the same network, inner optimizer and number of steps, but started from a fresh
random initialization on each task instead of the meta-learned one (its learning rate is about
the best for it too: lower ones learn too little in 5 steps, higher ones diverge). Both are
scored on the same held-out tasks; the script prints their mean query accuracy with a 95 %
interval and saves a learning curve (held-out accuracy during meta-training) as a PNG.

The curve's tasks are drawn apart from the final test tasks, and nothing is chosen by them: the
model tested is the last one. The curve starts from a single random initialization while the
baseline averages over one per task, and how well 5 steps do from a random initialization varies
a lot from draw to draw: the curve's first point need not lie on the baseline's line. Runs are
seeded and deterministic.

`--smoke` (or the environment variable HIGHER_EXAMPLES_SMOKE=1) shrinks the run to seconds for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import Tensor, nn
from tqdm import tqdm  # type: ignore[import-untyped]

import higher

DEFAULT_OUT = Path(__file__).parent / "output" / "maml_digits.png"
# What full-size runs measured, one entry per run (README and examples/README.md quote it).
RESULTS = Path(__file__).parent / "results" / "maml_digits.json"
TRAIN_DIGITS = (0, 1, 2, 3, 4)
TEST_DIGITS = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class Config:
    """The size of a run; `--smoke` replaces the fields named in `SMOKE`."""

    ways: int = 5
    shots: int = 5
    queries: int = 15  # query images per class
    channels: int = 32
    inner_steps: int = 5
    inner_lr: float = 0.5
    meta_lr: float = 3e-3
    meta_batch: int = 4  # tasks per meta-update
    meta_steps: int = 400
    eval_every: int = 50
    curve_tasks: int = 100  # held-out tasks per point of the learning curve
    test_tasks: int = 600
    seed: int = 0


SMOKE = {"meta_steps": 10, "eval_every": 5, "curve_tasks": 10, "test_tasks": 20}


# ---- data ------------------------------------------------------------------------------------


class Task(NamedTuple):
    """One few-shot problem: adapt on the support set, score on the query set."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor


def load_classes() -> list[Tensor]:
    """The images of each digit 0-9, shaped (n, 1, 8, 8) and scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return [images[labels == digit] for digit in range(10)]


def rotations_and_reflections(images: Tensor) -> list[Tensor]:
    """The 8 symmetries of the square applied to a stack of images (the first is the identity)."""
    turns = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    return turns + [t.flip(3) for t in turns]


class TaskSampler:
    """Draws N-way k-shot tasks from a list of classes (a stack of images each), from `seed`."""

    def __init__(self, classes: Sequence[Tensor], cfg: Config, seed: int) -> None:
        if len(classes) < cfg.ways:
            raise ValueError(f"{cfg.ways}-way tasks need {cfg.ways} classes, got {len(classes)}")
        self.classes = list(classes)
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        """A task: `ways` classes in random order (so the labels are permuted), random images."""
        cfg, g = self.cfg, self.generator
        chosen = torch.randperm(len(self.classes), generator=g)[: cfg.ways].tolist()
        support, query = [], []
        for images in (self.classes[c] for c in chosen):
            picked = images[torch.randperm(len(images), generator=g)[: cfg.shots + cfg.queries]]
            support.append(picked[: cfg.shots])
            query.append(picked[cfg.shots :])
        labels = torch.arange(cfg.ways)
        return Task(
            torch.cat(support),
            labels.repeat_interleave(cfg.shots),
            torch.cat(query),
            labels.repeat_interleave(cfg.queries),
        )

    def tasks(self, n: int) -> list[Task]:
        """`n` tasks drawn at once: a fixed set, to compare methods on identical tasks."""
        return [self.sample() for _ in range(n)]


# ---- model, inner loop, meta-update ----------------------------------------------------------


def make_model(cfg: Config) -> nn.Module:
    """A small convolutional classifier for 8x8 images: the only architecture of the demo."""
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2x2
        nn.Flatten(),
        nn.Linear(4 * c, cfg.ways),
    )


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def adapt_and_score(model: nn.Module, task: Task, cfg: Config) -> float:
    """Fine-tune a copy of `model` on the support set; return its accuracy on the query set.

    Test time needs no higher-order gradients (`track_higher_grads=False`), and the model itself
    stays as it is (`copy_initial_weights=True`, the default).
    """
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)
    with higher.innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(cfg.inner_steps):
            diffopt.step(F.cross_entropy(fmodel(task.x_support), task.y_support))
        with torch.no_grad():
            return accuracy(fmodel(task.x_query), task.y_query)


def meta_gradient(model: nn.Module, tasks: Sequence[Task], cfg: Config) -> list[float]:
    """Add to `model`'s `.grad` the MAML gradient of the tasks' mean query loss; return each
    task's query accuracy."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)
    scores = []
    for task in tasks:
        # copy_initial_weights=False: the fast weights start as the model's own parameters, so
        # the query loss's backward runs through every SGD step into the model's `.grad`.
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(cfg.inner_steps):
                diffopt.step(F.cross_entropy(fmodel(task.x_support), task.y_support))
            logits = fmodel(task.x_query)
            (F.cross_entropy(logits, task.y_query) / len(tasks)).backward()
        scores.append(accuracy(logits, task.y_query))
    return scores


def meta_train_step(
    model: nn.Module, meta_opt: torch.optim.Optimizer, tasks: Sequence[Task], cfg: Config
) -> float:
    """One MAML update of `model` from a batch of tasks; return their mean query accuracy."""
    meta_opt.zero_grad()
    scores = meta_gradient(model, tasks, cfg)
    meta_opt.step()
    return sum(scores) / len(scores)


# ---- evaluation ------------------------------------------------------------------------------


class Estimate(NamedTuple):
    """A mean accuracy and the half-width of its 95 % (normal approximation) interval."""

    mean: float
    half_width: float

    def __str__(self) -> str:
        return f"{100 * self.mean:5.1f} % ± {100 * self.half_width:.1f}"


def estimate(scores: Sequence[float]) -> Estimate:
    n = len(scores)
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)
    return Estimate(mean, 1.96 * math.sqrt(variance / n))


def evaluate(
    init_for_task: Callable[[int], nn.Module],
    tasks: Sequence[Task],
    cfg: Config,
    desc: str | None = None,
) -> Estimate:
    """Adapt the initialization `init_for_task(i)` to task `i`, for each; the query accuracy.

    With a `desc`, a progress bar shows under that name.
    """
    progress = tqdm(tasks, desc=desc, unit="task", leave=False, disable=desc is None)
    return estimate([adapt_and_score(init_for_task(i), t, cfg) for i, t in enumerate(progress)])


def random_inits(cfg: Config, seed: int) -> Callable[[int], nn.Module]:
    """The baseline's initializations: a fresh random network for each task, seeded by its index."""

    def init(i: int) -> nn.Module:
        torch.manual_seed(seed + i)
        return make_model(cfg)

    return init


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Curve:
    """Held-out accuracy during meta-training, with the meta-training accuracy beside it."""

    steps: list[int] = dataclasses.field(default_factory=list)
    heldout: list[Estimate] = dataclasses.field(default_factory=list)
    train: list[float] = dataclasses.field(default_factory=list)  # mean since the last point


TrainStep = Callable[[nn.Module, torch.optim.Optimizer, Sequence[Task], Config], float]
Evaluate = Callable[[Callable[[int], nn.Module], Sequence[Task], Config, str | None], Estimate]


def run(
    cfg: Config,
    out: Path | None,
    train_step: TrainStep = meta_train_step,
    evaluate: Evaluate = evaluate,
) -> tuple[Estimate, Estimate]:
    """Meta-train, then meta-test against the baseline; save the learning curve to `out`.

    `train_step` and `evaluate` are the two places a run may be spread over processes
    (distributed_maml.py); with `out=None` no progress is shown and nothing is saved.
    """
    torch.manual_seed(cfg.seed)
    digits = load_classes()
    train_classes = [c for d in TRAIN_DIGITS for c in rotations_and_reflections(digits[d])]
    test_classes = [digits[d] for d in TEST_DIGITS]
    train_sampler = TaskSampler(train_classes, cfg, seed=cfg.seed)
    curve_tasks = TaskSampler(test_classes, cfg, seed=cfg.seed + 1).tasks(cfg.curve_tasks)
    test_tasks = TaskSampler(test_classes, cfg, seed=cfg.seed + 2).tasks(cfg.test_tasks)

    model = make_model(cfg)
    meta_opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
    curve = Curve(steps=[0], heldout=[evaluate(lambda _: model, curve_tasks, cfg, None)])
    recent: list[float] = []
    steps = range(1, cfg.meta_steps + 1)
    bar = tqdm(steps, desc="meta-training", unit="step", disable=out is None)
    bar.set_postfix(held_out=f"{curve.heldout[0].mean:.3f}")
    for step in bar:
        recent.append(train_step(model, meta_opt, train_sampler.tasks(cfg.meta_batch), cfg))
        if step % cfg.eval_every == 0 or step == cfg.meta_steps:
            curve.steps.append(step)
            curve.heldout.append(evaluate(lambda _: model, curve_tasks, cfg, None))
            curve.train.append(sum(recent) / len(recent))
            recent.clear()
            bar.set_postfix(
                held_out=f"{curve.heldout[-1].mean:.3f}", train=f"{curve.train[-1]:.3f}"
            )

    shown = out is not None
    maml = evaluate(lambda _: model, test_tasks, cfg, "meta-test: MAML" if shown else None)
    baseline = evaluate(
        random_inits(cfg, cfg.seed + 3),
        test_tasks,
        cfg,
        "meta-test: baseline" if shown else None,
    )
    if out is not None:
        plot(curve, baseline, cfg, out)
    return maml, baseline


def plot(curve: Curve, baseline: Estimate, cfg: Config, out: Path) -> None:
    """Save the learning curve, with the baseline's accuracy and chance as horizontal lines."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.fill_between(
        curve.steps,
        [e.mean - e.half_width for e in curve.heldout],
        [e.mean + e.half_width for e in curve.heldout],
        color="C0",
        alpha=0.2,
    )
    ax.plot(curve.steps, [e.mean for e in curve.heldout], "C0.-", label="MAML, held-out digits")
    ax.plot(curve.steps[1:], curve.train, "C0:", label="MAML, meta-training tasks")
    low, high = baseline.mean - baseline.half_width, baseline.mean + baseline.half_width
    ax.axhspan(low, high, color="C1", alpha=0.2)
    ax.axhline(baseline.mean, color="C1", label="baseline (random init), held-out digits")
    ax.axhline(1 / cfg.ways, color="grey", ls="--", lw=1, label="chance")
    ax.set(
        title=f"{cfg.ways}-way {cfg.shots}-shot digits: query accuracy after "
        f"{cfg.inner_steps} SGD steps (95 % intervals shaded)",
        xlabel="meta-training step",
        ylabel="query accuracy",
        ylim=(0, 1),
    )
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def parse_args(
    argv: Sequence[str] | None = None, default_out: Path = DEFAULT_OUT
) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description="Few-shot MAML on scikit-learn's digits.")
    parser.add_argument("--shots", type=int, default=Config.shots, help="support images per class")
    parser.add_argument("--meta-steps", type=int, default=Config.meta_steps)
    parser.add_argument("--test-tasks", type=int, default=Config.test_tasks)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--out", type=Path, default=default_out, help="where to save the PNG")
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("HIGHER_EXAMPLES_SMOKE") == "1",
        help="a run of seconds, for CI (also: HIGHER_EXAMPLES_SMOKE=1)",
    )
    args = parser.parse_args(argv)
    cfg = Config(
        shots=args.shots, meta_steps=args.meta_steps, test_tasks=args.test_tasks, seed=args.seed
    )
    if args.smoke:
        cfg = dataclasses.replace(cfg, **SMOKE)
    return cfg, args.out


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads cost more than they save
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    maml, baseline = run(cfg, out)
    seconds = time.perf_counter() - start
    print(report(cfg, maml, baseline, out, seconds))
    if cfg.meta_steps == Config.meta_steps and cfg.test_tasks == Config.test_tasks:  # full size
        record(RESULTS, cfg, maml, baseline, seconds)


def record(path: Path, cfg: Config, maml: Estimate, baseline: Estimate, seconds: float) -> None:
    """Write a full-size run's accuracies into `path`, under the run's name (other runs kept)."""
    runs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    runs[f"{cfg.shots}-shot, seed {cfg.seed}"] = {
        "maml": str(maml).strip(),
        "baseline": str(baseline).strip(),
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "seconds": round(seconds),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(sorted(runs.items())), indent=2, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def report(cfg: Config, maml: Estimate, baseline: Estimate, out: Path, seconds: float) -> str:
    """What a run prints: the two accuracies, where the curve went, how long it took."""
    return (
        f"Meta-test on the held-out digits 5-9: {cfg.ways}-way {cfg.shots}-shot, "
        f"{cfg.test_tasks} tasks, {cfg.inner_steps} SGD steps (lr {cfg.inner_lr}).\n"
        "Query accuracy, mean with 95 % interval:\n"
        f"  MAML (meta-learned init)   {maml}\n"
        f"  baseline (random init)     {baseline}\n"
        f"Learning curve saved to {out}  ({seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
