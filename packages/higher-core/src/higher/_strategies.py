"""Which strategies compose: the one table every entry point consults before it runs.

A cell is a choice on each axis: how the unroll pays for its meta-gradient (`unroll=`), how
many tasks run at once (`tasks=`), how the steps run (the loop form `innerloop_ctx` eagerly
or with `compile=True`, the function form `meta_step` eagerly or compiled), and over how many
processes (`higher.distributed`: sharded tasks with `all_reduce_grads`, or a
`DistributedDataParallel` model). `TABLE` holds, for every cell, either `SUPPORTED` (the
cell is exact: float64 equal to the plain per-task full unroll, tested cell by cell in
`tests/test_core_composition.py`) or the message of its refusal, which names the cell and
what to use instead. `refuse` raises that message as `higher.CompositionError`.
`markdown_table` renders the table of docs/composition.md. `refuse_hand_written` is the one
refusal of an optimizer with a hand-written `_update` by the paths that run the step's rule
themselves (batched tasks, the compiled step, the meta-step).
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple

from higher._errors import CompositionError
from higher._unroll.modes import ForwardMode, Full, Mode, Recompute, Truncated
from higher.errors import HigherError
from higher.optim.internal import StepPlan

UnrollName = Literal["full", "recompute", "truncated", "forward"]
TasksName = Literal["one task", "T tasks"]
RunName = Literal["eager loop", "eager meta_step", "compiled step", "compiled meta_step"]
ProcessName = Literal["one process", "sharded", "DDP"]

UNROLLS: tuple[UnrollName, ...] = ("full", "recompute", "truncated", "forward")
TASKS: tuple[TasksName, ...] = ("one task", "T tasks")
RUNS: tuple[RunName, ...] = ("eager loop", "eager meta_step", "compiled step", "compiled meta_step")
PROCESSES: tuple[ProcessName, ...] = ("one process", "sharded", "DDP")

#: how each run is asked for
RUN_CALLS: dict[RunName, str] = {
    "eager loop": "innerloop_ctx(..., compile=False)",
    "eager meta_step": "meta_step(..., compile=False)",
    "compiled step": "innerloop_ctx(..., compile=True)",
    "compiled meta_step": "meta_step(..., compile=True)",
}

SUPPORTED = "supported"


class Cell(NamedTuple):
    """One combination of strategies."""

    unroll: UnrollName
    tasks: TasksName
    run: RunName
    process: ProcessName

    def describe(self) -> str:
        """The cell as a user asked for it, e.g. `unroll='recompute', tasks=T, ...`."""
        tasks = "tasks=None" if self.tasks == "one task" else "tasks=T"
        return f"unroll={self.unroll!r} with {tasks} in {RUN_CALLS[self.run]} ({self.process})"


_MEMORY = ("recompute", "truncated", "forward")

# Each refusal: (applies to the cell, why, what to use instead). The first that applies wins.
_RULES: list[tuple[str, str, str]] = [
    (
        "memory mode with tasks",
        "the memory modes rebuild or linearize the steps of one functional model, and batched "
        "tasks step stacked weights under torch.func.vmap, which neither mode records",
        "tasks=None with one inner loop per task (higher.distributed.shard spreads the tasks "
        "over processes), or unroll='full' with tasks=T",
    ),
    (
        "forward mode in meta_step",
        "meta_step differentiates with respect to the model's parameters, and forward mode "
        "carries derivatives for a few hyperparameters only",
        "innerloop_ctx(model, opt, unroll=higher.ForwardMode(wrt=[...])), or "
        "unroll='recompute' in meta_step",
    ),
    (
        "memory mode compiled",
        "torch.compile traces a full unroll's step, and a memory mode's step (rebuilt during "
        "the backward pass, or carried with tangents) is not traced",
        "compile=False with this unroll (exact), or unroll='full' with compile=True",
    ),
    (
        "compiled step with tasks",
        "the compiled step traces one task's step; the batched step of tasks=T is not traced",
        "meta_step(..., tasks=T, compile=True), which compiles the whole meta-step of T tasks, "
        "or innerloop_ctx(..., tasks=T) eagerly",
    ),
]


def _refusal(cell: Cell) -> tuple[str, str, str] | None:
    memory = cell.unroll in _MEMORY
    applies = {
        "memory mode with tasks": memory and cell.tasks == "T tasks",
        "forward mode in meta_step": cell.unroll == "forward" and "meta_step" in cell.run,
        "memory mode compiled": memory and cell.run.startswith("compiled"),
        "compiled step with tasks": cell.run == "compiled step" and cell.tasks == "T tasks",
    }
    for rule in _RULES:
        if applies[rule[0]]:
            return rule
    return None


def _entry(cell: Cell) -> str:
    rule = _refusal(cell)
    if rule is None:
        return SUPPORTED
    _, why, instead = rule
    return f"{cell.describe()} is not supported: {why}. Use {instead}"


#: every cell: SUPPORTED, or the message of its refusal
TABLE: dict[Cell, str] = {
    Cell(*axes): _entry(Cell(*axes)) for axes in itertools.product(UNROLLS, TASKS, RUNS, PROCESSES)
}


def unroll_name(mode: Mode) -> UnrollName:
    """The table's name of a memory mode."""
    if isinstance(mode, Full):
        return "full"
    if isinstance(mode, Recompute):
        return "recompute"
    if isinstance(mode, Truncated):
        return "truncated"
    assert isinstance(mode, ForwardMode)
    return "forward"


def refuse(
    mode: Mode, tasks: int | None, run: RunName, process: ProcessName = "one process"
) -> None:
    """Raise `CompositionError` with the table's message unless the cell is supported."""
    cell = Cell(unroll_name(mode), "one task" if tasks is None else "T tasks", run, process)
    entry = TABLE[cell]
    if entry != SUPPORTED:
        raise CompositionError(entry)


def refuse_hand_written(
    plan: StepPlan, optimizer: object, path: str, error: type[HigherError]
) -> None:
    """Raise `error` if `plan` runs a hand-written `_update` (no rule): `path` (the strategy
    that refuses it) runs the optimizer's rule itself, per task or traced.

    Examples:
        >>> import torch, higher
        >>> from higher.optim import internal
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> diffopt = higher.optim.get_diff_optim(torch.optim.SGD([w], lr=0.1), [w])
        >>> refuse_hand_written(internal.plan(diffopt, [w]), diffopt, "batched tasks",
        ...                     higher.FastPathError)  # SGD's twin is rule-based: no error
    """
    if plan.rule is None:
        raise error(
            f"{path} runs rule-based differentiable optimizers (every built-in twin, and "
            f"plugins written as a Rule); {type(optimizer).__name__} implements _update by "
            "hand: run it with innerloop_ctx(model, opt) and diffopt.step (tasks=None, "
            "compile=False; one inner loop per task)"
        )


def markdown_table(tested: set[Cell]) -> str:
    """The table as markdown: a row per unroll, tasks and run, a column per process. A
    supported cell shows ✓ only if it is in `tested` (the cells with a float64 test); a refused
    cell shows the number of its reason, listed below the table."""
    reasons: list[str] = []
    header = ["unroll", "tasks", "run", *PROCESSES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for unroll, tasks, run in itertools.product(UNROLLS, TASKS, RUNS):
        row = [f"`{unroll}`", tasks, f"`{RUN_CALLS[run]}`"]
        for process in PROCESSES:
            cell = Cell(unroll, tasks, run, process)
            rule = _refusal(cell)
            if rule is None:
                if cell not in tested:
                    raise AssertionError(f"supported cell {cell} has no float64 test")
                row.append("✓")
                continue
            text = f"{rule[1]}. Use {rule[2]}"
            if text not in reasons:
                reasons.append(text)
            row.append(f"✗ {reasons.index(text) + 1}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{k}. {reason}." for k, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"
