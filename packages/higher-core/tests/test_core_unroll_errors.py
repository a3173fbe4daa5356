"""What the memory modes refuse, and how: each refusal names what to do instead; and what
they promise besides exactness (nothing leaks, the user's model is untouched)."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import higher

DT = torch.float64


def mse(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    return lambda: F.mse_loss(model(x), y)


def setup(
    opt_lr: float = 0.1,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.to(DT)
    data = [(torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)) for _ in range(3)]
    return model, torch.optim.SGD(model.parameters(), lr=opt_lr), data


@pytest.mark.parametrize("unroll", ["recompute", higher.Truncated(window=2)], ids=repr)
def test_a_loss_tensor_where_a_closure_is_needed(unroll: Any) -> None:
    model, opt, data = setup()
    x, y = data[0]
    with higher.innerloop_ctx(model, opt, unroll=unroll) as (fmodel, diffopt):
        with pytest.raises(higher.UnrollError, match=r"closure=lambda: loss_fn\(fmodel"):
            diffopt.step(F.mse_loss(fmodel(x), y))
        with pytest.raises(ValueError, match="not both"):
            diffopt.step(F.mse_loss(fmodel(x), y), closure=lambda: F.mse_loss(fmodel(x), y))
        with pytest.raises(higher.UnrollError, match="neither"):
            diffopt.step()
        with pytest.raises(higher.UnrollError, match="scalar"):
            diffopt.step(closure=lambda: fmodel(x))
        with pytest.raises(higher.UnrollError, match="drop params="):
            diffopt.step(closure=lambda: fmodel(x).sum(), params=list(fmodel.parameters()))
        # none of the refusals took a step
        assert all(torch.equal(p, q) for p, q in zip(fmodel.parameters(), model.parameters()))


def test_modes_by_name_and_bad_modes() -> None:
    model, opt, _ = setup()
    with (
        pytest.raises(higher.UnrollError, match=r"Truncated\(window=W\)"),
        higher.innerloop_ctx(model, opt, unroll="truncated"),
    ):
        pass
    with (
        pytest.raises(higher.UnrollError, match="unknown unroll mode 'recomputed'"),
        higher.innerloop_ctx(model, opt, unroll="recomputed"),
    ):
        pass
    with (
        pytest.raises(higher.UsageError, match="got int"),
        higher.innerloop_ctx(model, opt, unroll=3),  # type: ignore[call-overload]
    ):
        pass
    with pytest.raises(higher.UnrollError, match="every must be at least 1"):
        higher.Recompute(every=0)
    with pytest.raises(higher.UsageError, match="window must be an int"):
        higher.Truncated(window=2.5)  # type: ignore[arg-type]
    with pytest.raises(higher.UsageError, match=r"wrap one tensor in a list: wrt=\[lr\]"):
        higher.ForwardMode(wrt=torch.ones(1, requires_grad=True))  # type: ignore[arg-type]
    with pytest.raises(higher.UnrollError, match="does not require grad"):
        higher.ForwardMode(wrt=[torch.ones(1)])
    with (
        pytest.raises(higher.UnrollError, match="nothing to save"),
        higher.innerloop_ctx(model, opt, track_higher_grads=False, unroll="recompute"),
    ):
        pass
    with higher.innerloop_ctx(model, opt, unroll="full") as (fmodel, diffopt):
        assert type(diffopt) is higher.optim.DifferentiableSGD  # the default path, untouched
        assert fmodel.keep_history
    with higher.innerloop_ctx(model, opt, unroll="recompute") as (fmodel, diffopt):
        assert isinstance(diffopt, higher.optim.DifferentiableSGD)
        assert not fmodel.keep_history


def test_the_optimizer_is_the_twin_itself_in_every_mode() -> None:
    """A memory mode takes `diffopt.step` through the optimizer's step driver: no subclass made
    at run time, and after the block the same object steps plainly."""
    model, opt, data = setup()
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    modes: list[Any] = ["recompute", higher.Recompute(every=2), higher.Truncated(window=2)]
    for unroll in [*modes, higher.ForwardMode(wrt=[lr])]:
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}, unroll=unroll) as (
            fmodel,
            diffopt,
        ):
            assert type(diffopt) is higher.optim.DifferentiableSGD, unroll
            for x, y in data[:2]:
                diffopt.step(closure=mse(fmodel, x, y))
        assert type(diffopt) is higher.optim.DifferentiableSGD
        x, y = data[0]
        diffopt.step(F.mse_loss(fmodel(x), y))  # the unroll has ended: a plain step


def test_a_closure_that_reads_a_loop_variable_is_caught() -> None:
    """The classic late-binding bug: every closure sees the last batch when run again."""
    model, opt, data = setup()
    with higher.innerloop_ctx(model, opt, unroll="recompute") as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(closure=lambda: F.mse_loss(fmodel(x), y))  # noqa: B023
        meta = fmodel(data[0][0]).sum()
    with pytest.raises(higher.UnrollError, match="bind it"):
        meta.backward()


def test_recompute_check_can_be_turned_off() -> None:
    model, opt, data = setup()
    with higher.innerloop_ctx(model, opt, unroll=higher.Recompute(check=False)) as (
        fmodel,
        diffopt,
    ):
        for x, y in data:
            diffopt.step(closure=lambda: F.mse_loss(fmodel(x), y))  # noqa: B023
        meta = fmodel(data[0][0]).sum()
    meta.backward()  # wrong, as asked (a test of the switch, not a use of it)


def test_weights_after_the_block_refuse_a_gradient() -> None:
    model, opt, data = setup()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll="recompute") as (
        fmodel,
        diffopt,
    ):
        for x, y in data:
            diffopt.step(closure=mse(fmodel, x, y))
        inside = fmodel(data[0][0]).sum()
    after = fmodel(data[0][0]).sum()  # the weights are there (evaluation works) ...
    torch.testing.assert_close(after, inside)
    with pytest.raises(higher.UnrollError, match="inside the block"):
        after.backward()  # ... but the unroll is gone
    inside.backward()  # a meta-loss computed inside the block: fine, after it too
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "unroll",
    ["recompute", higher.Recompute(every=2), higher.Truncated(window=2), "forward"],
    ids=repr,
)
@pytest.mark.parametrize("backward", [True, False])
def test_nothing_leaks_across_inner_loops(unroll: Any, backward: bool) -> None:
    """Freed by reference counting when the block has ended and the meta-loss is dropped
    (the closures hold the functional model: the block's end breaks that cycle)."""
    model, opt, data = setup()
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)

    def inner() -> tuple[weakref.ref[Any], weakref.ref[Any], torch.Tensor]:
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}, unroll=unroll) as (
            fmodel,
            diffopt,
        ):
            for x, y in data:
                diffopt.step(closure=mse(fmodel, x, y))
            meta = fmodel(data[0][0]).sum()
        return weakref.ref(fmodel), weakref.ref(diffopt), meta

    gc.disable()
    try:
        fref, oref, meta = inner()
        # the meta-loss keeps what its backward needs: the closures, so the functional model
        assert (fref() is not None) == (unroll != "forward")
        if backward:
            meta.backward()
        del meta
        assert fref() is None and oref() is None
    finally:
        gc.enable()


def test_forward_mode_refusals() -> None:
    model, opt, data = setup()
    x, y = data[0]
    with (
        pytest.raises(higher.UnrollError, match=r"copy_initial_weights=False.*'recompute'"),
        higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll="forward"),
    ):
        pass
    with (
        higher.innerloop_ctx(model, opt, unroll="forward") as (fmodel, diffopt),
        pytest.raises(higher.UnrollError, match="nothing to differentiate"),
    ):
        diffopt.step(F.mse_loss(fmodel(x), y))
    lrs = [torch.full_like(p, 0.1).requires_grad_() for p in model.parameters()]  # 21 elements
    mode = higher.ForwardMode(max_directions=4)
    with (
        higher.innerloop_ctx(model, opt, override={"lr": [lrs]}, unroll=mode) as (fmodel, diffopt),
        pytest.raises(higher.UnrollError, match=r"21 derivatives.*'recompute'"),
    ):
        diffopt.step(F.mse_loss(fmodel(x), y))
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    data_x = x.clone().requires_grad_()
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}, unroll="forward") as (
        fmodel,
        diffopt,
    ):
        with pytest.raises(higher.UnrollError, match=r"shape \(5, 3\).*'recompute'"):
            diffopt.step(F.mse_loss(fmodel(data_x), y))  # data that requires grad, not in wrt
        diffopt.step(F.mse_loss(fmodel(x), y))
        other = torch.tensor(0.5, dtype=DT, requires_grad=True)
        with pytest.raises(higher.UnrollError, match="not among ForwardMode's wrt"):
            diffopt.step(F.mse_loss(fmodel(x), y), override={"momentum": [other]})
        meta = F.mse_loss(fmodel(x), y)
    with pytest.raises(higher.UnrollError, match="third order"):
        torch.autograd.grad(meta, lr, create_graph=True)  # a graph for a later gradient
    (g,) = torch.autograd.grad(meta, lr)
    assert g.shape == ()


def test_a_twin_that_overrides_step_is_refused() -> None:
    class Stepper(torch.optim.SGD):
        pass

    class OwnStep(higher.optim.DifferentiableSGD):
        def step(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
            return super().step(*args, **kwargs)

    higher.register_optim(Stepper, OwnStep)
    model, _, _ = setup()
    # each refusal names the strategy and says what to drop (not the strategy itself)
    with (
        pytest.raises(
            higher.UnrollError,
            match=r"so unroll=Recompute\(every=1, check=True\) cannot .* without unroll=",
        ),
        higher.innerloop_ctx(model, Stepper(model.parameters(), lr=0.1), unroll="recompute"),
    ):
        pass
    with (
        pytest.raises(
            higher.UnrollError, match=r"so compiled steps cannot .* without compile=True"
        ),
        higher.innerloop_ctx(model, Stepper(model.parameters(), lr=0.1), compile=True),
    ):
        pass
    # the plain unroll takes it
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with higher.innerloop_ctx(model, Stepper(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        assert isinstance(diffopt, OwnStep)


def test_the_user_model_and_optimizer_are_untouched() -> None:
    model, opt, data = setup()
    opt.step()  # no grads: nothing moves, but the state exists
    before = [p.detach().clone() for p in model.parameters()]
    with higher.innerloop_ctx(model, opt, unroll=higher.Recompute(every=2)) as (fmodel, diffopt):
        for x, y in data:
            diffopt.step(closure=mse(fmodel, x, y))
        fmodel(data[0][0]).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # copy_initial_weights=True


def test_compile_step_refuses_a_memory_mode_uncompiled_it_runs_in_one() -> None:
    from torch.torch_version import TorchVersion

    model, opt, data = setup()
    eager = higher.compile_step(lambda m, x, y: F.mse_loss(m(x), y), compile=False)
    grads = []
    for unroll in ("full", "recompute"):  # uncompiled it is diffopt.step, its loss a closure
        ctx = higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll=unroll)
        with ctx as (fmodel, diffopt):
            for x, y in data:
                eager(fmodel, diffopt, x, y)
            meta = F.mse_loss(fmodel(data[0][0]), data[0][1])
            grads.append(torch.autograd.grad(meta, list(model.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with higher.innerloop_ctx(model, opt, unroll="recompute") as (fmodel, diffopt):
        if TorchVersion(torch.__version__) >= "2.3":  # refused before anything compiles
            step = higher.compile_step(lambda m, x, y: F.mse_loss(m(x), y), backend="eager")
            with pytest.raises(higher.UsageError, match="memory mode"):
                step(fmodel, diffopt, *data[0])


Closure = Callable[[], torch.Tensor]
Model = Callable[[torch.Tensor], torch.Tensor]
Grads = list[torch.Tensor | None]


def _maml_meta_loss(
    unroll: Any,
    closure_of: Callable[[Model, torch.Tensor, torch.Tensor], Closure] = mse,
    callback: Callable[[Grads], Grads] | None = None,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and a meta-loss (its backward not run yet) of a MAML unroll whose steps take
    the closures `closure_of(fmodel, x, y)` and `callback`."""
    model, opt, data = setup()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, unroll=unroll) as (
        fmodel,
        diffopt,
    ):
        for x, y in data:
            diffopt.step(closure=closure_of(fmodel, x, y), grad_callback=callback)
        return model, F.mse_loss(fmodel(data[0][0]), data[0][1])


def _step_counting_clip() -> Callable[[Grads], Grads]:
    """A clipping schedule that counts its calls: it changes when a step is run again."""
    calls = [0]

    def callback(grads: Grads) -> Grads:
        calls[0] += 1
        return higher.optim.clip_grad_norm(1.0 / calls[0])(grads)

    return callback


def _random_scale() -> Callable[[Grads], Grads]:
    """Python random numbers, which no step's random-number state covers."""
    rng = random.Random(0)

    def callback(grads: Grads) -> Grads:
        scale = rng.uniform(0.5, 1.5)
        return [None if g is None else g * scale for g in grads]

    return callback


@pytest.mark.parametrize("make", [_step_counting_clip, _random_scale], ids=["counter", "random"])
@pytest.mark.parametrize(
    "unroll",
    ["recompute", higher.Recompute(every=2), higher.Truncated(window=2)],
    ids=repr,
)
def test_a_grad_callback_that_is_not_pure_is_caught(unroll: Any, make: Any) -> None:
    """It runs again when the backward pass rebuilds a step: a different result there would
    be a silently wrong meta-gradient, so it is an error naming the step and the fix."""
    _, meta = _maml_meta_loss(unroll, callback=make())
    with pytest.raises(higher.UnrollError, match=r"step \d's grad_callback .* must be pure"):
        meta.backward()


def test_a_nan_loss_is_no_other_loss() -> None:
    """NaN is not equal to itself; a step whose loss is NaN is the same step when rebuilt."""
    model, meta = _maml_meta_loss(
        "recompute", lambda fmodel, x, y: mse(lambda x: fmodel(x) * float("nan"), x, y)
    )
    meta.backward()
    assert all(bool(p.grad.isnan().all()) for p in model.parameters() if p.grad is not None)


def test_a_closure_whose_gradient_changes_is_caught() -> None:
    """Its loss is the same when run again, its gradient is not: caught by the gradients'
    fingerprint (no grad_callback needed)."""
    calls = [0]

    def flipping(fmodel: Model, x: torch.Tensor, y: torch.Tensor) -> Closure:
        def loss() -> torch.Tensor:
            calls[0] += 1
            value = F.mse_loss(fmodel(x), y)
            return value if calls[0] <= 3 else 2 * value.detach() - value  # 3 steps

        return loss

    _, meta = _maml_meta_loss("recompute", flipping)
    with pytest.raises(higher.UnrollError, match=r"step 2's gradients differ when the step is"):
        meta.backward()
