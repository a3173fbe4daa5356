"""Every cell of the composition table (`higher._strategies.TABLE`): unroll x tasks x run x
processes. A supported cell's meta-gradients (with respect to the initial weights and a
learnable learning rate; forward mode: the learning rate's) equal, in float64 to 1e-8, the plain
per-task full unroll (for `Truncated`: the one detached at the window's start); a refused cell
raises `higher.CompositionError` with the table's message. The distributed columns run in one
launch of two gloo ranks, every supported cell on sharded tasks. docs/composition.md is the
table rendered from this registry, and must stay so.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.torch_version import TorchVersion

import higher
from higher._strategies import SUPPORTED, TABLE, Cell, markdown_table

HERE = Path(__file__).parent
WORKER = HERE / "_composition_worker.py"
DOCS = HERE.parents[2] / "docs" / "composition.md"
JOIN_TIMEOUT_S = 300.0
RTOL = 1e-8
Results = dict[tuple[str, ...], list[torch.Tensor]]


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_composition_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile imports the module of a loss it traces
    spec.loader.exec_module(module)
    return module


worker = _load_worker()

#: the cells with a float64 test here: every supported one (the docs table checks it)
TESTED = {cell for cell, entry in TABLE.items() if entry == SUPPORTED}


def _reference(unroll: str) -> list[torch.Tensor]:
    model = worker.make_model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    worker.reference(model, lr, worker.make_tasks(), truncated=unroll == "truncated")
    result: list[torch.Tensor] = worker.gradients(model, lr, unroll)
    return result


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=1e-12)
    assert any(w.abs().sum() > 0 for w in want)  # the comparison is not of zeros alone


def _ids(cell: Cell) -> str:
    return "-".join(part.replace(" ", "_") for part in cell)


LOCAL = [cell for cell in TABLE if cell.process == "one process"]


@pytest.mark.parametrize("cell", LOCAL, ids=_ids)
def test_cell_in_one_process(cell: Cell) -> None:
    model = worker.make_model()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    if TABLE[cell] != SUPPORTED:
        with pytest.raises(higher.CompositionError) as info:
            worker.run_cell(cell, model, lr, worker.make_tasks())
        assert str(info.value) == TABLE[cell]
        assert all(p.grad is None for p in model.parameters()) and lr.grad is None
        return
    worker.run_cell(cell, model, lr, worker.make_tasks())
    _assert_close(worker.gradients(model, lr, cell.unroll), _reference(cell.unroll))


def test_truncated_reference_differs_from_full() -> None:
    """The truncated cells' reference is not the full unroll's (the window matters)."""
    full, truncated = _reference("full"), _reference("truncated")
    assert not torch.allclose(full[-1], truncated[-1], rtol=1e-3)
    assert all(t.abs().sum() == 0 for t in truncated[:-1])  # the initial weights: constants


def test_refused_ddp_cells_raise_from_the_table() -> None:
    """A DDP model is refused before any collective in a refused cell (no process group
    needed: the refusal comes first)."""
    refused = [c for c in TABLE if c.process == "DDP" and TABLE[c] != SUPPORTED]
    assert refused
    local = refused[0]._replace(process="one process")
    assert TABLE[local] != SUPPORTED  # the process axis adds no refusal of its own
    assert TABLE[refused[0]].endswith(TABLE[local].split(" is not supported: ")[1])


def _compiling_torch() -> bool:
    return bool(TorchVersion(torch.__version__) >= worker.MIN_TORCH["compiled step"])


def test_compiled_loop_takes_a_loss_function_and_its_batch() -> None:
    """compile=True: step takes partial(loss_fn, fmodel, *batch); a loss tensor, a lambda, a
    partial of another model, or per-step options are refused, and change nothing."""
    model = worker.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys, xq, yq = worker.make_tasks()[0]
    with higher.innerloop_ctx(model, opt, compile=True) as (fmodel, diffopt):
        wrong: list[dict[str, Any]] = [
            {"loss": worker.inner(fmodel, xs, ys, xq, yq)},
            {"closure": lambda: worker.inner(fmodel, xs, ys, xq, yq)},
            {"closure": functools.partial(worker.inner, model, xs, ys, xq, yq)},
        ]
        for kwargs in wrong:
            with pytest.raises(higher.UsageError, match=r"functools\.partial\(loss_fn, fmodel"):
                diffopt.step(**kwargs)
        step = functools.partial(worker.inner, fmodel, xs, ys, xq, yq)
        with pytest.raises(higher.UsageError, match="no per-step override"):
            diffopt.step(closure=step, override={"lr": [0.5]})
        assert len(list(fmodel.parameters(time=-1))) == 4
        with pytest.raises(higher.patch.PatchError, match="1 step"):
            list(fmodel.parameters(time=1))  # no step was taken


def test_compiled_loops_share_their_graphs() -> None:
    """Every inner loop with compile=True reuses the graphs of the first (one compiled step
    per loss function and options, not one per loop)."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    model = worker.make_model()
    tasks = worker.make_tasks()
    options = {"backend": counting}
    after_first = 0
    for k, task in enumerate(tasks):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with higher.innerloop_ctx(model, opt, compile=_compiling_torch(),
                                  compile_options=options if _compiling_torch() else None) as (
            fmodel, diffopt):  # fmt: skip
            for _ in range(3):
                diffopt.step(closure=functools.partial(worker.inner, fmodel, *task))
        if k == 0:
            after_first = len(graphs)
    if _compiling_torch():  # momentum's first step (fresh state) and the later ones
        assert 1 <= after_first <= 3
    assert len(graphs) == after_first


def test_aliases_are_the_strategies() -> None:
    """batched_innerloop_ctx is innerloop_ctx(tasks=T) (and needs its T); compile_meta_step is
    meta_step(compile=True)."""
    model = worker.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.batched_innerloop_ctx(model, opt, tasks=2) as (fmodel, diffopt):
        assert isinstance(fmodel, higher.BatchedModule)
        assert isinstance(diffopt, higher.BatchedOptimizer)
    with pytest.raises(higher.FastPathError, match="tasks must be a positive int"):
        higher.batched_innerloop_ctx(model, opt, tasks=None)  # type: ignore[arg-type]
    meta = higher.compile_meta_step(worker.inner, worker.outer, steps=2, compile=False)
    assert isinstance(meta, higher.MetaStep) and meta.steps == 2 and meta.tasks is None
    with pytest.raises(higher.CompositionError) as info:
        higher.meta_step(worker.inner, worker.outer, steps=2, unroll="forward")
    assert str(info.value) == TABLE[Cell("forward", "one task", "eager meta_step", "one process")]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """One launch of two gloo ranks that runs every supported distributed cell."""
    tmp = tmp_path_factory.mktemp("composition")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, str(WORKER), "--world-size", "2", "--store", str(tmp / "s")]
    command += ["--out", str(tmp)]
    logs = [(tmp / f"rank{r}.stdout", tmp / f"rank{r}.stderr") for r in range(2)]
    procs = []
    start = time.perf_counter()
    for rank, (out_path, err_path) in enumerate(logs):
        with out_path.open("w") as out, err_path.open("w") as err:
            procs.append(
                subprocess.Popen([*command, "--rank", str(rank)], env=env, stdout=out, stderr=err)
            )
    try:
        for proc in procs:
            proc.wait(timeout=max(JOIN_TIMEOUT_S - (time.perf_counter() - start), 1.0))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        stderr = "\n".join(e.read_text()[-2000:] for _, e in logs)
        pytest.fail(f"the composition launch hung; the ranks said:\n{stderr}")
    for proc, (_, err_path) in zip(procs, logs):
        assert proc.returncode == 0, err_path.read_text()[-4000:]
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    for cell in ranks[0]:  # every rank ends with the same averaged meta-gradient
        _assert_close(ranks[1][cell], ranks[0][cell])
    results: Results = ranks[0]
    return results


DISTRIBUTED = [cell for cell in TABLE if cell.process != "one process"]


@pytest.mark.parametrize("cell", DISTRIBUTED, ids=_ids)
def test_cell_distributed(
    cell: Cell, distributed_results: dict[tuple[str, ...], list[torch.Tensor]]
) -> None:
    if TABLE[cell] != SUPPORTED:
        assert tuple(cell) not in distributed_results
        local = TABLE[Cell(cell.unroll, cell.tasks, cell.run, "one process")]
        assert TABLE[cell].split(" is not supported: ")[1] == local.split(" is not supported: ")[1]
        return
    _assert_close(distributed_results[tuple(cell)], _reference(cell.unroll))


def test_docs_table_is_generated_from_the_tests() -> None:
    """docs/composition.md shows the table this file tests, between its markers."""
    text = DOCS.read_text()
    begin, end = "<!-- composition table: begin -->\n", "<!-- composition table: end -->"
    assert begin in text and end in text, f"{DOCS} lost its table markers"
    shown = text.split(begin, 1)[1].split(end, 1)[0]
    assert shown == markdown_table(TESTED), (
        "docs/composition.md's table differs from the one generated from the tests: paste "
        "higher._strategies.markdown_table(...) (print it with: python "
        "packages/higher-core/tests/test_core_composition.py)"
    )


if __name__ == "__main__":
    print(markdown_table(TESTED), end="")
