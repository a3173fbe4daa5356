"""What every contender of `peers.py` shares: the workloads, their data, the worker loop.

Pure torch: the peers import this module in their own venvs (torch 2.13.0 there too), so the
models, data and seeds are identical in every process. A contender is a module with
`meta_step(problem) -> Callable[[], list[Tensor]]`: the callable runs one meta-iteration (every
task's inner loop, second order, and the meta-loss's gradient) and returns the meta-gradient.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

#: Workload name -> what it is (the table's first column explains itself with these).
WORKLOADS: dict[str, str] = {
    "conv-sgd": "4×conv64+BN+ReLU+pool, 28×28×1, 5-way, 4 tasks, 5+15 shots, 5 SGD steps",
    "conv-adam": "same conv net and tasks, 5 Adam steps (torch.optim-exact Adam)",
    "sine": "MLP 1→40→40→1, 8 tasks, 10 shots, 10 SGD steps",
    "sine-32": "the sine workload with 32 tasks (the tasks axis)",
    "sine-128": "the sine workload with 128 tasks",
    "long": "MLP 8→32→32→1, 1 task, 100 SGD steps",
    "long-adam": "MLP 8→32→32→1 (tanh), 1 task, 100 Adam steps (lr 0.01, torch.optim-exact Adam)",
    "hpo": "per-parameter learning rates of an MLP 8→32→32→1, 50-step SGD unroll",
}

#: The long unrolls of memory.py (one task, `k` inner steps set per request); "-hpo": the
#: meta-gradient is taken with respect to four learnable hyperparameters instead.
MEMORY_WORKLOADS: dict[str, str] = {
    "mem-conv": "4×conv64+BN+ReLU+pool, 28×28×1, 5-way, 1 task, 5+15 shots, k SGD steps, "
    "meta-gradient w.r.t. the initial weights",
    "mem-mlp": "MLP 32→256→256→1, batch 128, 1 task, k SGD steps, w.r.t. the initial weights",
    "mem-conv-hpo": "the mem-conv unroll, w.r.t. lr, momentum, weight decay, dampening",
    "mem-mlp-hpo": "the mem-mlp unroll, w.r.t. lr, momentum, weight decay, dampening",
}

MetaStep = Callable[[], list[torch.Tensor]]
#: called by an eager contender at the end of each phase of a task (`task_split.py`): "setup",
#: "first step", "later steps", "meta-gradient", "exit"
Mark = Callable[[str], None]


def no_mark(phase: str) -> None:
    """The `Mark` of a timed run: nothing."""


P = TypeVar("P")  # a problem, as a contender's `build` takes it


@dataclass
class Sizes:
    """The knobs `--smoke` shrinks."""

    conv_channels: int = 64
    conv_tasks: int = 4
    conv_way: int = 5
    conv_support: int = 5  # per class
    conv_query: int = 15  # per class
    conv_steps: int = 5
    sine_tasks: int = 8
    sine_shots: int = 10
    sine_steps: int = 10
    long_steps: int = 100
    hpo_steps: int = 50
    mlp_width: int = 256  # memory.py's MLP

    #: tasks of the sine-32 and sine-128 workloads (the tasks axis)
    sine_more: tuple[int, int] = (32, 128)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(8, 1, 5, 1, 1, 2, 2, 4, 2, 4, 4, mlp_width=16, sine_more=(3, 4))


@dataclass
class Problem:
    """One workload, built the same way from the same seed in every process."""

    name: str
    model: nn.Module
    #: (support x, support y, query x, query y) per task
    tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: str  # "sgd" or "adam"
    lr: float
    steps: int
    #: "init": meta-gradient wrt the initial weights (MAML); "lr": wrt `lrs` (HPO)
    wrt: str = "init"
    #: one learnable learning rate per parameter tensor (HPO only)
    lrs: list[torch.Tensor] = field(default_factory=list)
    #: "hypers": the SGD hyperparameters learned (name -> 0-d tensor), one param group
    hypers: dict[str, torch.Tensor] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def conv_net(channels: int, way: int) -> nn.Module:
    def block(cin: int) -> list[nn.Module]:
        return [
            # no bias before BatchNorm: its exact gradient is 0, and Adam would turn float
            # round-off there into steps (and sqrt(0) into NaN second-order gradients)
            nn.Conv2d(cin, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, momentum=1.0),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    # 28 -> 14 -> 7 -> 3 -> 1
    layers = block(1) + block(channels) + block(channels) + block(channels)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, way))


def mlp(*widths: int, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def make_problem(
    name: str, sizes: Sizes, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Problem:
    """Workload `name`: model and data from seed 0, on `device` in `dtype`."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    if name in ("conv-sgd", "conv-adam"):
        s = sizes
        model = conv_net(s.conv_channels, s.conv_way)
        tasks = []
        for _ in range(s.conv_tasks):
            ys = torch.arange(s.conv_way).repeat_interleave(s.conv_support).to(device)
            yq = torch.arange(s.conv_way).repeat_interleave(s.conv_query).to(device)
            xs, xq = randn(len(ys), 1, 28, 28), randn(len(yq), 1, 28, 28)
            # class-dependent means so the inner loop has something to learn
            xs, xq = xs + ys.view(-1, 1, 1, 1).to(dtype), xq + yq.view(-1, 1, 1, 1).to(dtype)
            tasks.append((xs, ys, xq, yq))
        adam = name == "conv-adam"
        problem = Problem(
            name,
            model,
            tasks,
            F.cross_entropy,
            "adam" if adam else "sgd",
            1e-3 if adam else 0.4,
            s.conv_steps,
        )
    elif name.startswith("sine"):
        model = mlp(1, 40, 40, 1)
        tasks = []
        n_tasks = {"sine": sizes.sine_tasks, "sine-32": sizes.sine_more[0],
                   "sine-128": sizes.sine_more[1]}[name]  # fmt: skip
        for _ in range(n_tasks):
            amp, phase = (
                0.1 + 4.9 * torch.rand(1, generator=gen),
                torch.pi * torch.rand(1, generator=gen),
            )
            xs = (torch.rand(sizes.sine_shots, 1, generator=gen) * 10 - 5).to(device, dtype)
            xq = (torch.rand(sizes.sine_shots, 1, generator=gen) * 10 - 5).to(device, dtype)
            a, p = amp.to(device, dtype), phase.to(device, dtype)
            tasks.append((xs, a * torch.sin(xs - p), xq, a * torch.sin(xq - p)))
        problem = Problem(name, model, tasks, F.mse_loss, "sgd", 0.01, sizes.sine_steps)
    elif name in ("long", "hpo", "long-adam"):
        # tanh for Adam: a dead ReLU unit's exact zero gradient gives sqrt(v) at v = 0, whose
        # infinite slope makes the meta-gradient NaN for torch.optim's Adam and every peer
        model = mlp(8, 32, 32, 1, activation=nn.Tanh if name == "long-adam" else nn.ReLU)
        w = randn(8, 1)
        xs, xq = randn(64, 8), randn(64, 8)
        tasks = [(xs, torch.tanh(xs @ w), xq, torch.tanh(xq @ w))]
        steps = sizes.hpo_steps if name == "hpo" else sizes.long_steps
        if name == "long-adam":
            problem = Problem(name, model, tasks, F.mse_loss, "adam", 0.01, steps)
        else:
            problem = Problem(name, model, tasks, F.mse_loss, "sgd", 0.05, steps)
        if name == "hpo":
            problem.wrt = "lr"
            problem.lrs = [
                torch.full((), 0.05, device=device, dtype=dtype, requires_grad=True)
                for _ in model.parameters()
            ]
    elif name.startswith("mem-"):
        problem = _memory_problem(name, sizes, randn, device, dtype)
    else:
        raise ValueError(f"unknown workload {name!r}: expected one of {list(WORKLOADS)}")
    problem.model.to(device, dtype).train()
    return problem


def _memory_problem(
    name: str,
    sizes: Sizes,
    randn: Callable[..., torch.Tensor],
    device: str,
    dtype: torch.dtype,
) -> Problem:
    """The workloads of memory.py: one task, the number of steps set per request."""
    if name.startswith("mem-conv"):
        way = sizes.conv_way
        model = conv_net(sizes.conv_channels, way)
        ys = torch.arange(way).repeat_interleave(sizes.conv_support).to(device)
        yq = torch.arange(way).repeat_interleave(sizes.conv_query).to(device)
        xs, xq = randn(len(ys), 1, 28, 28), randn(len(yq), 1, 28, 28)
        xs, xq = xs + ys.view(-1, 1, 1, 1).to(dtype), xq + yq.view(-1, 1, 1, 1).to(dtype)
        problem = Problem(name, model, [(xs, ys, xq, yq)], F.cross_entropy, "sgd", 0.1, 1)
    else:
        model = mlp(32, sizes.mlp_width, sizes.mlp_width, 1)
        w = randn(32, 1)
        xs, xq = randn(128, 32), randn(128, 32)
        tasks = [(xs, torch.tanh(xs @ w), xq, torch.tanh(xq @ w))]
        problem = Problem(name, model, tasks, F.mse_loss, "sgd", 0.05, 1)
    if name.endswith("-hpo"):
        problem.wrt = "hypers"
        values = {"lr": problem.lr, "momentum": 0.5, "weight_decay": 1e-4, "dampening": 0.1}
        problem.hypers = {
            k: torch.tensor(v, device=device, dtype=dtype, requires_grad=True)
            for k, v in values.items()
        }
    return problem


# ---- measuring ---------------------------------------------------------------------------------


def tensor_peak(step: MetaStep) -> tuple[float, list[torch.Tensor]]:
    """Peak MiB held by tensor storages made while `step` runs (its meta-gradient too).

    Every storage an op returns (forward, backward, optimizer, anything torch dispatches) is
    counted from the op that makes it until it is freed (a weak reference's finalizer: torch
    >= 2.0 keeps one Python object per live storage); views share their base's storage and
    count once. Storages made before `step` are not counted, so this is what the step adds,
    exactly and independently of the allocator and of the process's other memory (RSS)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    probe = torch.zeros(1)
    if weakref.ref(probe.untyped_storage())() is None:  # no Python object kept per storage
        raise RuntimeError(
            f"tensor_peak needs a torch that keeps one Python object per live storage (torch "
            f"{torch.__version__} does not; 2.13 does)"
        )

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def _freed(self, key: int, nbytes: int) -> None:
            self.seen.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = id(storage)
                    if key not in self.seen:
                        self.seen.add(key)
                        nbytes = storage.nbytes()
                        self.live += nbytes
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(storage, self._freed, key, nbytes)
            return out

    gc.collect()
    with Live() as live:
        grads = step()
    return live.peak / 2**20, grads


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_peak(step: MetaStep) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Peak RSS while running `step` once (MiB), its growth over the RSS before it; the
    step's meta-gradient."""
    gc.collect()
    try:  # reset the high-water mark to the current RSS (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        grads = step()
        peak = _status_kib("VmHWM")
    except OSError:  # no clear_refs: the lifetime peak, in a fresh process it is near enough
        before = _status_kib("VmRSS")
        grads = step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_peak_mib": peak / 1024, "rss_delta_mib": (peak - before) / 1024}, grads


def saved_bytes(step: MetaStep) -> float:
    """MiB of unique storages saved for backward over one meta-step (the storages are held
    until the end, so a freed address reused by a later tensor is never miscounted)."""
    storages: dict[tuple[int, int], Any] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages.setdefault((s.data_ptr(), s.nbytes()), s)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    total = sum(nbytes for _, nbytes in storages)
    storages.clear()
    return total / 2**20


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(step: MetaStep, device: str, reps: int) -> float:
    """Mean seconds of one meta-step over `reps` back-to-back runs, after one untimed run: the
    worker has been idle while the others ran, and a training loop runs its steps back to back
    (thread pools asleep and caches taken by another process cost every contender, but not
    equally)."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync(device)
    return (time.perf_counter() - start) / reps


# ---- the worker loop ---------------------------------------------------------------------------


def worker_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="this project: compile_step")
    parser.add_argument("--unroll", help="this project: the memory mode (memory.py)")
    parser.add_argument("--variant", default="", help="which API or solver a contender uses")
    parser.add_argument("--batched", action="store_true", help="this project: batched tasks")
    parser.add_argument("--meta-step", action="store_true", help="this project: compile_meta_step")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    return parser.parse_args()


def serve(name: str, build: Callable[[Problem], MetaStep], versions: dict[str, str]) -> None:
    """Answer the orchestrator's requests about `WORKLOADS`, one JSON line each, until "quit"
    (see `serve_problems`)."""

    def make(workload: str, smoke: bool, device: str, dtype: torch.dtype) -> Problem:
        return make_problem(workload, Sizes.smoke() if smoke else Sizes(), device, dtype)

    serve_problems(make, build, versions)


def serve_problems(
    make: Callable[[str, bool, str, torch.dtype], P],
    build: Callable[[P], MetaStep],
    versions: dict[str, str],
) -> None:
    """Answer the orchestrator's requests, one JSON line each, until "quit".

    `make(workload, smoke, device, dtype)` builds a workload's problem, `build(problem)` the
    step that computes its gradient. Requests: {"op": "time", "workload": w, "reps": n} ->
    {"seconds": s}; {"op": "grad", "workload": w, "path": p[, "dtype": "float64"]} saves the
    meta-gradient; {"op": "memory", "workload": w, "path": p} -> peak RSS and saved-for-backward
    MiB, and saves that step's meta-gradient (run it in a fresh worker: the allocator keeps what
    earlier steps freed); {"op": "versions"}.
    """
    args = worker_args()
    torch.set_num_threads(args.threads)
    steps: dict[str, MetaStep] = {}
    first: dict[str, float] = {}  # seconds of the build and first meta-step (compiling, if any)

    def problem(workload: str, dtype: torch.dtype = torch.float32) -> P:
        return make(workload, args.smoke, args.device, dtype)

    def step_of(workload: str) -> MetaStep:
        if workload not in steps:
            start = time.perf_counter()
            steps[workload] = build(problem(workload))
            steps[workload]()  # warm-up
            sync(args.device)
            first[workload] = time.perf_counter() - start
        return steps[workload]

    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        answer: dict[str, Any]
        if op == "quit":
            print(json.dumps({"bye": True}), flush=True)
            return
        if op == "versions":
            answer = {
                **versions,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": sys.version.split()[0],
            }
        elif op == "time":
            workload = request["workload"]
            seconds = time_step(step_of(workload), args.device, int(request.get("reps", 1)))
            answer = {"seconds": seconds, "first_s": first[workload]}
        elif op == "grad":
            dtype = getattr(torch, request.get("dtype", "float32"))
            _save(build(problem(request["workload"], dtype))(), request["path"])
            answer = {"saved": request["path"]}
        elif op == "unroll":  # memory.py: one task unrolled for `steps` steps
            unrolled = problem(request["workload"])
            assert isinstance(unrolled, Problem)  # memory.py's workloads are peers.py's kind
            unrolled.steps = int(request["steps"])
            step = build(unrolled)
            if unrolled.steps <= 20:
                step()  # warm-up (a longer unroll comes after a shorter one in the same worker)
            elapsed: list[float] = []

            def timed(step: MetaStep = step, elapsed: list[float] = elapsed) -> list[torch.Tensor]:
                start = time.perf_counter()
                out = step()
                sync(args.device)
                elapsed.append(time.perf_counter() - start)
                return out

            usage, _ = rss_peak(timed)
            seconds = elapsed[0]
            peak, grads = tensor_peak(step)  # a second run: the tracking slows ops down
            answer = {"peak_mib": peak, "seconds": seconds, **usage}
            if "path" in request:
                _save(grads, request["path"])
        elif op == "memory":
            step = build(problem(request["workload"]))
            answer, grads = rss_peak(step)
            _save(grads, request["path"])
            try:
                answer["saved_mib"] = saved_bytes(step)
            except RuntimeError:  # torch.func transforms refuse saved-tensor hooks: unmeasured
                answer["saved_mib"] = float("nan")
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def _save(grads: list[torch.Tensor], path: str) -> None:
    torch.save([g.detach().to("cpu", torch.float64) for g in grads], path)


def contender_env(threads: int) -> dict[str, str]:
    """The environment of every worker: the same thread pinning everywhere."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


#: the section of peers.md that benchmarks/step_overhead.py writes (peers.py keeps it)
STEP_SECTION = "Per-step overhead"


def _section(lines: list[str], title: str) -> tuple[int, int] | None:
    """Where section `## title` is among `lines`: its heading's index and the end of its body
    (the next `## ` heading, or the end)."""
    heading = f"## {title}"
    if heading not in lines:
        return None
    start = lines.index(heading)
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")),
               len(lines))  # fmt: skip
    return start, end


def read_section(path: Path, title: str) -> str | None:
    """The body of section `## title` of the markdown file at `path` (None: no such section)."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    span = _section(lines, title)
    return None if span is None else "\n".join(lines[span[0] + 1 : span[1]]).strip("\n")


def replace_section(path: Path, title: str, body: str | None) -> None:
    """Make `body` the section `## title` of the markdown file at `path` (added at its end
    where it has none; removed where `body` is None)."""
    lines = path.read_text().splitlines() if path.exists() else []
    span = _section(lines, title)
    if span is not None:
        lines = lines[: span[0]] + lines[span[1] :]
    while lines and not lines[-1].strip():
        lines.pop()
    if body is not None:
        lines += ["", f"## {title}", "", body]
    path.write_text("\n".join(lines).lstrip("\n") + "\n")
