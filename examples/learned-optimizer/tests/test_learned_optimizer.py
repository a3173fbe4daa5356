"""`LearnedOptimizer` itself: its step by hand, save and load, bad weights refused, training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from higher_learned_opt import (
    FEATURES,
    LEARNED,
    LearnedOptimizer,
    init_weights,
    load_weights,
    pretrained_info,
    pretrained_weights,
    save_weights,
    weight_count,
)

import higher.optim


def test_the_untrained_rule_is_adam_at_ten_times_lr() -> None:
    # a zero output layer but the log-step bias: exp(log 10) * lr times Adam's direction
    weights = init_weights(hidden=4)
    weights[-2 - 2 * 4 : -2] = 0.0
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    a = torch.nn.Parameter(w.detach().clone())
    opt, adam = LearnedOptimizer([w], lr=1e-3, weights=weights), torch.optim.Adam([a], lr=1e-2)
    for k in range(5):
        for p, o in ((w, opt), (a, adam)):
            o.zero_grad()
            ((p - k) ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
            o.step()
    torch.testing.assert_close(w, a, rtol=1e-6, atol=1e-9)
    assert opt.state[w]["step"].item() == 5.0
    assert sorted(opt.state[w]) == ["exp_avg", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq", "step"]


def test_weights_layout() -> None:
    assert len(FEATURES) == 9
    assert weight_count(16) == 194 == pretrained_weights().numel()
    assert init_weights(hidden=5, seed=3).shape == (weight_count(5),)
    assert torch.equal(init_weights(seed=3), init_weights(seed=3))
    assert not torch.equal(init_weights(seed=3), init_weights(seed=4))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    weights = init_weights(hidden=7, seed=2) * 1.2345
    w = torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([w], weights=weights)
    path = tmp_path / "weights.json"
    opt.save(path, note="a test")
    assert torch.equal(load_weights(path), weights)
    again = LearnedOptimizer.load(path, [w], lr=0.5)
    assert torch.equal(again.param_groups[0]["weights"], weights)
    assert again.param_groups[0]["lr"] == 0.5
    doc = json.loads(path.read_text())
    assert (doc["hidden"], doc["features"], doc["info"]) == (7, 9, {"note": "a test"})
    # the same steps from the loaded weights
    for o in (opt, again):
        o.param_groups[0]["lr"] = 1e-3
    w2 = torch.nn.Parameter(torch.ones(3))
    again = LearnedOptimizer.load(path, [w2])
    for p, o in ((w, opt), (w2, again)):
        for _ in range(3):
            o.zero_grad()
            (p**2 * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
            o.step()
    assert torch.equal(w, w2)


def test_the_pretrained_weights_are_the_default() -> None:
    opt = LearnedOptimizer([torch.nn.Parameter(torch.ones(1))])
    assert torch.equal(opt.param_groups[0]["weights"], pretrained_weights())
    assert pretrained_info()["estimator"] == "PES"


def test_a_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_weights(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a weights file"):
        load_weights(bad)
    save_weights(init_weights(hidden=2), bad)
    doc = json.loads(bad.read_text())
    doc["weights"] = doc["weights"][:-1]
    bad.write_text(json.dumps(doc))
    with pytest.raises(TypeError, match="must be a 1-d tensor of hidden"):
        load_weights(bad)


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ([0.0] * 194, TypeError, "must be a tensor"),
        (
            torch.zeros(194, dtype=torch.int64),
            TypeError,
            "floating-point tensor, got dtype torch.int64",
        ),
        (torch.zeros(193), TypeError, r"hidden \* 12 \+ 2 values .* got shape \(193,\)"),
        (torch.zeros(2, 97), TypeError, r"got shape \(2, 97\)"),
        (torch.zeros(2), TypeError, r"got shape \(2,\)"),
        (torch.full((194,), math.nan), ValueError, "NaN or an infinity"),
    ],
)
def test_bad_weights_are_refused(weights: Any, error: type[Exception], match: str) -> None:
    w = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(error, match=match):
        LearnedOptimizer([w], weights=weights)


def test_bad_weights_are_refused_by_the_twin_too() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    diffopt = higher.optim.get_diff_optim(LearnedOptimizer([w]), [w])
    with pytest.raises(higher.optim.HyperparameterTypeError, match=r"got shape \(5,\)"):
        diffopt.step(w.sum(), params=[w], override={"weights": [torch.zeros(5)]})
    hyper = {"lr": 0.1, "weights": torch.zeros(3, 3), "maximize": False}
    with pytest.raises(higher.optim.HyperparameterTypeError, match="1-d tensor"):
        LEARNED.init([w], hyper)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"lr": -1.0}, "Invalid learning rate"), ({"lr": "big"}, "Invalid learning rate")],
)
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LearnedOptimizer([torch.nn.Parameter(torch.ones(1))], **options)


def test_closure_skipped_parameters_and_sparse_gradients() -> None:
    w, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = LearnedOptimizer([w, frozen])
    assert opt.step(lambda: (w**2).sum().backward() or 7.0) == 7.0
    assert (w < 1).all() and frozen.tolist() == [1.0, 1.0] and frozen not in opt.state
    w.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_training_an_ordinary_model_reduces_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, generator=gen)
    y = torch.sin(x @ torch.randn(5, 1, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = LearnedOptimizer(model.parameters())
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]
    assert all(math.isfinite(v) for v in losses)


def test_maximize_ascends() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LearnedOptimizer([w], maximize=True)
    for _ in range(10):
        opt.zero_grad()
        (-(w**2).sum()).backward()  # maximize -|w|^2: towards 0
        opt.step()
    assert (w.abs() < 1).all()


def test_bad_weights_in_an_override_are_refused_before_any_step() -> None:
    """The rule's check runs when the twin is made with an override, not at its first step."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = LearnedOptimizer([w])
    with pytest.raises(higher.optim.HyperparameterTypeError, match=r"param group 0: .*\(5,\)"):
        higher.optim.get_diff_optim(opt, [w], override={"weights": [torch.zeros(5)]})
