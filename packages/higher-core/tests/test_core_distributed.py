"""higher.distributed: sharding, weighted gradient averaging, innerloop_ctx on a DDP model.

The multi-process tests launch two CPU processes (gloo, a FileStore in tmp_path, loopback only)
running `_distributed_worker.py`, and compare each rank's weights after 3 outer steps with one
process running every task (float64, 1e-10). One launch runs all the equality scenarios; the
failure launches check that a rank that raises or hangs ends the run with a clear error.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
import torch

import higher
import higher.distributed
from higher.distributed._ddp import learnable_leaves
from higher.distributed._shard import _buckets

WORKER = Path(__file__).with_name("_distributed_worker.py")
JOIN_TIMEOUT_S = 180.0  # the whole launch; a hung rank is killed and the test fails


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


class Rank(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def launch(
    tmp_path: Path, group: str, *, backend: str = "gloo", timeout_s: float = 3.0
) -> tuple[list[Rank], float]:
    """Run the worker as ranks 0 and 1; their outcomes and the wall time of the whole launch."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # the loopback, nothing else
    command = [sys.executable, str(WORKER), "--world-size", "2", "--store", str(tmp_path / "s")]
    command += ["--out", str(tmp_path), "--group", group, "--backend", backend]
    command += ["--timeout", str(timeout_s)]
    start = time.perf_counter()
    # Output to files, not pipes: a rank blocked on a full pipe while the other waits for it in
    # a collective would hang the launch; and a hung launch can still show what each rank said.
    logs = [(tmp_path / f"rank{r}.stdout", tmp_path / f"rank{r}.stderr") for r in range(2)]
    procs = []
    for rank, (out_path, err_path) in enumerate(logs):
        with out_path.open("w") as out, err_path.open("w") as err:
            procs.append(
                subprocess.Popen(
                    [*command, "--rank", str(rank)], env=env, stdout=out, stderr=err, text=True
                )
            )
    ranks = []
    try:
        for proc, (out_path, err_path) in zip(procs, logs):
            remaining = JOIN_TIMEOUT_S - (time.perf_counter() - start)
            proc.wait(timeout=max(remaining, 1.0))
            ranks.append(Rank(proc.returncode, out_path.read_text(), err_path.read_text()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        said = "\n".join(
            f"rank {r} stderr:\n{e.read_text()[-2000:]}" for r, (_, e) in enumerate(logs)
        )
        pytest.fail(f"the {group} launch did not end within {JOIN_TIMEOUT_S} s\n{said}")
    return ranks, time.perf_counter() - start


# ---- multi-process: the weights of every rank equal one process's ------------------------------


@pytest.fixture(scope="module")
def equality_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    tmp_path = tmp_path_factory.mktemp("equality")
    ranks, _ = launch(tmp_path, "equality")
    for rank, outcome in enumerate(ranks):
        assert outcome.returncode == 0, f"rank {rank}:\n{outcome.stderr[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", [n for n in worker.SCENARIOS if n != "uneven_unweighted"])
def test_two_ranks_end_with_the_weights_of_one_process(
    equality_runs: list[dict[str, list[torch.Tensor]]], name: str
) -> None:
    scenario = worker.SCENARIOS[name]
    reference = worker.train(scenario)  # no process group here: one process, every task
    initial = [p.detach() for p in worker.make_model(torch.device("cpu")).parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(reference, initial)) > 1e-2
    rank0, rank1 = (run[name] for run in equality_runs)
    assert len(rank0) == len(reference) == len(initial) + scenario.learnable_lr
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)  # one averaged gradient: the same step on every rank
    for got, want in zip(rank0, reference):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if scenario.learnable_lr:
        assert abs(rank0[-1].item() - 0.1) > 1e-4  # the lr itself was trained


def test_the_plain_mean_of_uneven_shares_is_not_the_reference(
    equality_runs: list[dict[str, list[torch.Tensor]]],
) -> None:
    """The control: with 3 and 2 tasks, weight=1 averages per-rank means, which differs."""
    reference = worker.train(worker.SCENARIOS["uneven"])
    unweighted = equality_runs[0]["uneven_unweighted"]
    assert max((a - b).abs().max().item() for a, b in zip(unweighted, reference)) > 1e-4


# ---- multi-process: a failing rank ends the run with a clear error ----------------------------


def test_a_rank_that_raises_ends_the_run_with_a_clear_error(tmp_path: Path) -> None:
    (rank0, rank1), seconds = launch(tmp_path, "raise", timeout_s=3.0)
    assert rank1.returncode != 0 and "injected failure on rank 1" in rank1.stderr
    assert rank0.returncode != 0
    assert "DistributedError: the all-reduce of the gradients across 2 ranks failed" in (
        rank0.stderr
    )
    # Before that, different tensors on the two ranks were refused on both.
    for outcome in (rank0, rank1):
        assert "refused: the ranks passed different tensors" in outcome.stdout
    assert seconds < JOIN_TIMEOUT_S


def test_a_rank_that_hangs_times_out_the_others(tmp_path: Path) -> None:
    """Here rank 0 meta-trains a DDP model: the error comes out of its backward()."""
    (rank0, rank1), seconds = launch(tmp_path, "hang", timeout_s=3.0)
    assert rank0.returncode != 0
    assert "DistributedError" in rank0.stderr and "Timed out" in rank0.stderr
    assert "run all but each rank's last backward inside ddp.no_sync()" in rank0.stderr
    assert "injected failure on rank 1" in rank1.stderr  # it woke, after rank 0 had given up
    assert seconds < JOIN_TIMEOUT_S


@pytest.mark.cuda
def test_nccl_two_gpus_end_with_the_weights_of_one_process(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank: 2 GPUs, this machine has fewer")
    ranks, _ = launch(tmp_path, "equality", backend="nccl")
    for rank, outcome in enumerate(ranks):
        assert outcome.returncode == 0, f"rank {rank}:\n{outcome.stderr[-4000:]}"
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("uneven", "learnable_lr", "ddp_uneven", "ddp_accumulate"):
        reference = worker.train(worker.SCENARIOS[name])
        for a, b, want in zip(runs[0][name], runs[1][name], reference):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, want, rtol=0, atol=1e-10)


# ---- one process: sharding ---------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
def test_shards_cover_every_task_once_and_differ_by_at_most_one(n: int, world_size: int) -> None:
    tasks = [f"t{i}" for i in range(n)]
    shares = [
        higher.distributed.shard(tasks, rank=r, world_size=world_size)
        for r in range(4)[:world_size]
    ]
    assert [t for share in shares for t in share] == tasks
    sizes = [len(s) for s in shares]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    counts = [higher.distributed.shard(n, rank=r, world_size=world_size) for r in range(world_size)]
    assert [list(c) for c in counts] == [[int(t[1:]) for t in s] for s in shares]


def test_shard_without_a_process_group_is_everything() -> None:
    assert higher.distributed.world() == (0, 1)
    assert higher.distributed.shard((1, 2, 3)) == [1, 2, 3]
    assert higher.distributed.shard(4) == range(4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, higher.distributed.DistributedValueError, "both rank and world_size"),
        ({"rank": 2, "world_size": 2}, higher.distributed.DistributedValueError, r"\[0, 2\)"),
        ({"rank": -1, "world_size": 2}, ValueError, r"got -1"),
        ({"rank": 0, "world_size": 0}, ValueError, "at least 1"),
        ({"rank": 0.0, "world_size": 2}, TypeError, "rank must be an int"),
        ({"rank": True, "world_size": 2}, TypeError, "rank must be an int"),
    ],
)
def test_shard_refuses_a_bad_rank(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        higher.distributed.shard(range(4), **kwargs)  # type: ignore[call-overload]


def test_shard_refuses_what_is_no_task_list() -> None:
    with pytest.raises(higher.UsageError, match="sequence or a count"):
        higher.distributed.shard({1, 2})  # type: ignore[call-overload]
    with pytest.raises(higher.distributed.DistributedValueError, match="at least 0, got -3"):
        higher.distributed.shard(-3)


def test_a_launcher_without_a_process_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    w = torch.nn.Parameter(torch.ones(2))
    for call in (
        higher.distributed.world,
        lambda: higher.distributed.shard(range(4)),
        lambda: higher.distributed.all_reduce_grads([w]),
    ):
        with pytest.raises(
            higher.distributed.DistributedError, match=r"WORLD_SIZE=2.*init_process"
        ):
            call()


# ---- one process: all_reduce_grads -------------------------------------------------------------


def test_all_reduce_grads_alone_leaves_the_gradients_and_returns_the_weight() -> None:
    model = torch.nn.Linear(2, 1)
    model(torch.ones(3, 2)).sum().backward()
    before = [p.grad for p in model.parameters()]
    assert higher.distributed.all_reduce_grads(model, weight=3) == 3.0
    assert all(p.grad is b for p, b in zip(model.parameters(), before))  # untouched


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "no tensors to reduce"),
        ([1.0], {}, TypeError, r"tensors\[0\] must be a torch.Tensor, got float"),
        (None, {"weight": -1.0}, ValueError, "at least 0, got -1.0"),
        (None, {"weight": math.nan}, ValueError, "finite"),
        (None, {"weight": True}, TypeError, "weight must be a number"),
        (None, {"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be positive"),
        # alone, this process is every rank: weight 0 is every rank passing 0
        (None, {"weight": 0}, ValueError, "every rank passed weight 0.*every rank"),
    ],
)
def test_all_reduce_grads_refuses_bad_arguments(
    args: list[object] | None, kwargs: dict[str, object], error: type, match: str
) -> None:
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(error, match=match):
        higher.distributed.all_reduce_grads([w] if args is None else args, **kwargs)  # type: ignore[arg-type]


def test_all_reduce_grads_refuses_a_single_tensor_and_graph_carrying_grads() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(higher.UsageError, match="not a single tensor"):
        higher.distributed.all_reduce_grads(w)
    w.grad = torch.ones(2, requires_grad=True) * 2  # what backward(create_graph=True) leaves
    with pytest.raises(higher.distributed.DistributedValueError, match="create_graph=True"):
        higher.distributed.all_reduce_grads([w])


def test_buckets_split_by_dtype_and_device_and_cap() -> None:
    t = [torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(100)]
    # float32: 16 + 16 bytes fit a 40-byte cap, the 400-byte tensor gets a bucket of its own
    assert _buckets(t, 40) == [[0, 2], [3], [1]]
    assert _buckets(t, 1e9) == [[0, 2, 3], [1]]
    assert _buckets(t, 1) == [[0], [2], [3], [1]]


def test_learnable_leaves_reach_through_computed_hyperparameters() -> None:
    model = torch.nn.Linear(2, 1)
    log_lr = torch.tensor(-2.0, requires_grad=True)
    momentum = torch.tensor(0.5, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    override = {"lr": [log_lr.exp()], "momentum": [momentum]}
    with higher.innerloop_ctx(model, opt, override=override) as (_, diffopt):
        leaves = learnable_leaves(diffopt)
    assert [id(t) for t in leaves] == [id(log_lr), id(momentum)]


def test_importing_higher_initializes_no_process_group() -> None:
    code = (
        "import sys, higher, torch.distributed as d; "
        "print(d.is_initialized(), 'higher.distributed._ddp' in sys.modules, "
        "higher.distributed.world())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False False World(rank=0, size=1)"
