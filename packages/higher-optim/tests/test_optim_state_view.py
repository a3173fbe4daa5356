"""The optimizer state a Rule twin keeps between steps is typed per bucket; `diffopt.state` is a
live view of it in torch's per-parameter format: references held across steps read the current
values, writes through the view take effect on the next step, and every result stays equal to
torch's own optimizer (float64) whatever the buckets do between steps."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import torch

import higher.optim

T = torch.Tensor


def leaves(n: int = 3) -> list[T]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n)]


def loss_of(ps: list[T], used: list[int] | None = None) -> T:
    used = list(range(len(ps))) if used is None else used
    return sum(((ps[i].sin() * (i + 1)) ** 2).sum() for i in used)  # type: ignore[return-value]


def pair(
    make: Callable[[list[T]], torch.optim.Optimizer], n: int = 3
) -> tuple[list[T], torch.optim.Optimizer, higher.optim.DifferentiableOptimizer]:
    """Torch's optimizer over its own leaves, and a twin over copies of them."""
    ref = leaves(n)
    ours = [p.detach().clone().requires_grad_() for p in ref]
    return ref, make(ref), higher.optim.get_diff_optim(make(ours), ours)


def torch_step(opt: torch.optim.Optimizer, ref: list[T], used: list[int] | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss_of(ref, used).backward()
    opt.step()


def steps(
    diffopt: higher.optim.DifferentiableOptimizer,
    opt: torch.optim.Optimizer,
    ref: list[T],
    cur: list[T] | None,
    n: int,
) -> list[T]:
    """`n` steps of both optimizers (from the twin's slots where `cur` is None); the twin's new
    parameters."""
    cur = list(diffopt.param_groups[0]["params"]) if cur is None else cur
    for _ in range(n):
        cur = diffopt.step(loss_of(cur), params=cur)
        torch_step(opt, ref)
    return cur


def matches(
    diffopt: higher.optim.DifferentiableOptimizer,
    opt: torch.optim.Optimizer,
    ref: list[T],
    cur: list[T],
    names: tuple[str, ...],
) -> None:
    """The twin's parameters and state `names` equal torch's."""
    for j, p in enumerate(ref):
        close(cur[j], p)
        for name in names:
            close(diffopt.state[0][j][name], opt.state[p][name])


def close(a: T, b: T) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def adam(ps: list[T]) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=0.05)


def test_held_references_read_the_current_state() -> None:
    ref, opt, diffopt = pair(adam)
    cur = steps(diffopt, opt, ref, None, 1)
    group, slot = diffopt.state[0], diffopt.state[0][1]
    before = slot["exp_avg"]
    cur = steps(diffopt, opt, ref, cur, 3)
    assert slot["step"] == 4 and group[2]["step"] == 4
    assert sorted(slot) == ["exp_avg", "exp_avg_sq", "step"] and len(slot) == 3
    assert diffopt.state[0] is group and diffopt.state[0][1] == slot
    assert not torch.equal(before, slot["exp_avg"])
    for j, p in enumerate(ref):
        close(group[j]["exp_avg"], opt.state[p]["exp_avg"])
        close(dict(group[j])["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        close(cur[j], p)


def test_writes_through_the_view_take_effect_on_the_next_step() -> None:
    def sgd(ps: list[T]) -> torch.optim.Optimizer:
        return torch.optim.SGD(ps, lr=0.1, momentum=0.9)

    ref, opt, diffopt = pair(sgd)
    cur = steps(diffopt, opt, ref, None, 2)
    held = diffopt.state[0][1]
    buffer = torch.full((4,), 0.5, dtype=torch.float64)
    held["momentum_buffer"] = buffer  # as published 0.2.1 code resets a buffer
    opt.state[ref[1]]["momentum_buffer"] = buffer.clone()
    assert diffopt.state[0][1]["momentum_buffer"] is buffer
    cur = steps(diffopt, opt, ref, cur, 2)
    matches(diffopt, opt, ref, cur, ("momentum_buffer",))


def test_a_write_that_splits_a_bucket_keeps_every_result_exact() -> None:
    ref, opt, diffopt = pair(adam)
    cur = steps(diffopt, opt, ref, None, 2)
    diffopt.state[0][0]["step"] = 7  # one slot now counts differently: a bucket of its own
    opt.state[ref[0]]["step"] = torch.tensor(7.0)
    diffopt.state[0][2]["exp_avg"] = diffopt.state[0][2]["exp_avg"] * 2
    opt.state[ref[2]]["exp_avg"].mul_(2)
    del diffopt.state[0][1]["exp_avg_sq"]
    diffopt.state[0][1]["exp_avg_sq"] = opt.state[ref[1]]["exp_avg_sq"].clone()
    cur = steps(diffopt, opt, ref, cur, 3)
    assert [diffopt.state[0][j]["step"] for j in range(3)] == [10, 5, 5]
    matches(diffopt, opt, ref, cur, ("exp_avg", "exp_avg_sq"))


def test_a_parameter_without_a_gradient_changes_the_buckets_exactly() -> None:
    ref, opt, diffopt = pair(adam)
    cur = list(diffopt.param_groups[0]["params"])
    for used in ([0, 1, 2], [0, 2], [0, 2], [0, 1, 2], [1], [0, 1, 2]):
        cur = diffopt.step(loss_of(cur, used), params=cur)
        torch_step(opt, ref, used)
    assert [diffopt.state[0][j]["step"] for j in range(3)] == [5, 4, 5]
    matches(diffopt, opt, ref, cur, ("exp_avg",))


def test_a_slot_replaced_by_a_dict_is_used() -> None:
    ref, opt, diffopt = pair(adam)
    cur = steps(diffopt, opt, ref, None, 2)
    held = diffopt.state[0][2]
    saved = {k: v.clone() if isinstance(v, T) else v for k, v in held.items()}
    cur = steps(diffopt, opt, ref, cur, 1)
    diffopt.state[0][2] = saved  # back to the state of step 2 for this slot
    opt.state[ref[2]] = {k: v.clone() if isinstance(v, T) else v for k, v in saved.items()}
    opt.state[ref[2]]["step"] = torch.tensor(2.0)
    assert held["step"] == 2 and dict(diffopt.state[0])[2] == held
    cur = steps(diffopt, opt, ref, cur, 2)
    matches(diffopt, opt, ref, cur, ("exp_avg_sq",))


def test_state_dict_copies_and_pickles_of_the_typed_state() -> None:
    ref, opt, diffopt = pair(adam)
    cur = steps(diffopt, opt, ref, None, 3)
    saved = diffopt.state_dict()
    expected = opt.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    for number, slot in expected["state"].items():
        assert sorted(saved["state"][number]) == sorted(slot)
        for name, value in slot.items():
            close(saved["state"][number][name], value)
    deep = copy.deepcopy(diffopt)
    loaded = pickle.loads(pickle.dumps(diffopt))
    assert all(
        v.grad_fn is None for s in loaded.state[0].values() for v in s.values() if isinstance(v, T)
    )
    for other in (deep, loaded):
        assert other.state[0] is not diffopt.state[0]
        for j in range(3):
            close(other.state[0][j]["exp_avg"], diffopt.state[0][j]["exp_avg"])
    before = diffopt.state[0][0]["exp_avg"]
    step = deep.step(loss_of(cur), params=cur)
    assert diffopt.state[0][0]["exp_avg"] is before and deep.state[0][0]["step"] == 4
    torch_step(opt, ref)
    close(step[0], ref[0])
    qs = [p.detach().clone() for p in ref]
    fresh = higher.optim.get_diff_optim(adam(qs), qs)
    fresh.load_state_dict(saved)
    copied = adam([p.detach().clone().requires_grad_() for p in ref])
    diffopt.copy_state_to(copied)
    assert [fresh.state[0][j]["step"] for j in range(3)] == [3, 3, 3]
    for j, p in enumerate(copied.param_groups[0]["params"]):
        close(copied.state[p]["exp_avg"], diffopt.state[0][j]["exp_avg"])
        close(fresh.state[0][j]["exp_avg_sq"], diffopt.state[0][j]["exp_avg_sq"])


def test_first_order_steps_keep_the_typed_state_detached() -> None:
    ps = leaves()
    diffopt = higher.optim.get_diff_optim(adam(ps), ps, track_higher_grads=False)
    cur = list(ps)
    for _ in range(3):
        cur = diffopt.step(loss_of(cur), params=cur)
    slots = list(diffopt.state[0].values())
    assert all(s["exp_avg"].grad_fn is None and s["exp_avg_sq"].grad_fn is None for s in slots)
    assert [s["step"] for s in slots] == [3, 3, 3]
