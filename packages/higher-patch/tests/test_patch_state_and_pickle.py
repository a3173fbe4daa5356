# mypy: disable-error-code="union-attr,index,operator,arg-type"
# (tests poke at dynamic module attributes, which torch types as `Tensor | Module`)
"""The original module is never written through a functional module; functional modules pickle
and are freed by refcounting alone.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import higher.patch as hp

DT = torch.float64


class Net(nn.Module):
    """A module-level class (pickle finds it by name) with a buffer-holding submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.bn(self.body(x))))
        return out


def _net() -> Net:
    torch.manual_seed(0)
    return Net().to(DT)


def _x() -> torch.Tensor:
    return torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module) -> list[Any]:
    """Everything of the original a functional module could write: values, grads, flags."""
    return [
        (name, t.detach().clone(), None if t.grad is None else t.grad.clone(), t.requires_grad)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    ]


def _assert_unchanged(model: nn.Module, before: list[Any]) -> None:
    after = _snapshot(model)
    assert [a[0] for a in after] == [b[0] for b in before]
    for (name, value, grad, flag), (_, value0, grad0, flag0) in zip(after, before):
        assert torch.equal(value, value0), f"{name} changed"
        assert (grad is None) == (grad0 is None), f"{name}.grad changed"
        assert grad is None or torch.equal(grad, grad0), f"{name}.grad changed"
        assert flag == flag0, f"{name}.requires_grad changed"


@contextmanager
def _gc_disabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- freed by refcounting ----------------------------------------------------------------


RNNS: dict[str, Callable[[], nn.Module]] = {
    "lstm": lambda: nn.LSTM(3, 4, num_layers=2),
    "gru": lambda: nn.GRU(3, 4, bidirectional=True),
    "rnn": lambda: nn.RNN(3, 4),
    "lstm-in-a-model": lambda: nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4)),
}


@pytest.mark.parametrize("name", list(RNNS))
def test_a_functional_rnn_is_freed_by_refcounting_alone(name: str) -> None:
    model = RNNS[name]().to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    gc.collect()
    with _gc_disabled():
        fmodel = hp.monkeypatch(model, copy_initial_weights=False)
        out = fmodel(x, params=[p * 0.5 for p in fmodel.parameters()])[0]
        out.sum().backward()
        clone = copy.deepcopy(fmodel)
        torch.testing.assert_close(clone(x)[0], fmodel(x)[0], rtol=0, atol=0)
        refs = [weakref.ref(fmodel), weakref.ref(clone)]
        refs += [weakref.ref(m) for m in [*fmodel.modules(), *clone.modules()]]
        del fmodel, clone, out
        assert [r() for r in refs] == [None] * len(refs)


# ---- load_state_dict -----------------------------------------------------------------------


@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_loads_into_the_fast_weights_and_never_the_original(
    copy_initial_weights: bool, track: bool, strict: bool
) -> None:
    model, x = _net(), _x()
    model(x).sum().backward()  # the original has gradients of its own too
    before = _snapshot(model)
    fmodel = hp.monkeypatch(
        model, copy_initial_weights=copy_initial_weights, track_higher_grads=track
    )
    fmodel(x, params=[p + 0.1 for p in fmodel.parameters()])
    steps = len(fmodel._higher_store.history)
    target = {k: v + 1.0 for k, v in model.state_dict().items()}  # floats and the step count
    if not strict:
        del target["head.bias"]
    current_head_bias = fmodel.head.bias
    result = fmodel.load_state_dict(target, strict=strict)
    assert result.missing_keys == ([] if strict else ["head.bias"])
    _assert_unchanged(model, before)
    for name, p in fmodel.named_fast_params().items():
        if name in target:
            assert torch.equal(p, target[name]), name
            # a leaf, unless linked straight through to the original (first-order mode)
            assert p.requires_grad and (p.is_leaf or not (track or copy_initial_weights))
        else:
            assert p is current_head_bias or torch.equal(p, current_head_bias)
    for name, b in fmodel.named_buffers():
        assert torch.equal(b, target[name]), name
    assert len(fmodel._higher_store.history) == (steps + 1 if track else 1)
    # The loaded weights are used, and gradients flow through later steps as before.
    expected = torch.func.functional_call(model, fmodel.state_dict(), (x,))
    torch.testing.assert_close(fmodel(x), expected, rtol=0, atol=0)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda sd: sd.pop("body.weight"), "Missing key"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "Unexpected key"),
        (lambda sd: sd.update({"head.weight": torch.zeros(3, 3)}), "size mismatch"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_a_rejected_load_changes_nothing(
    copy_initial_weights: bool, mutate: Callable[[dict[str, Any]], Any], match: str
) -> None:
    model, x = _net(), _x()
    before = _snapshot(model)
    fmodel = hp.monkeypatch(model, copy_initial_weights=copy_initial_weights)
    fmodel(x)  # running statistics of the copy move on
    weights = fmodel.fast_params
    buffers = {k: (b, b.clone()) for k, b in fmodel.named_buffers()}
    target = {k: v + 1.0 for k, v in model.state_dict().items()}
    mutate(target)
    with pytest.raises(RuntimeError, match=match):
        fmodel.load_state_dict(target)
    assert all(a is b for a, b in zip(fmodel.fast_params, weights))
    assert [fmodel.body.weight, fmodel.head.weight] == [weights[0], weights[-2]]
    assert len(fmodel._higher_store.history) == 1
    for k, b in fmodel.named_buffers():
        assert b is buffers[k][0] and torch.equal(b, buffers[k][1]), k
    _assert_unchanged(model, before)


def test_load_state_dict_on_a_submodule_and_with_assign() -> None:
    model, x = _net(), _x()
    before = _snapshot(model)
    fmodel = hp.monkeypatch(model, copy_initial_weights=False)
    head = {"weight": torch.full((2, 4), 0.5, dtype=DT), "bias": torch.ones(2, dtype=DT)}
    fmodel.head.load_state_dict(head)
    assert torch.equal(fmodel.head.weight, head["weight"])
    assert fmodel.body.weight is model.body.weight  # the rest keeps its current fast weights
    assigned = {k: v.clone() for k, v in model.state_dict().items()}
    assigned["body.bias"] = torch.full((4,), 2.0, dtype=DT)
    fmodel.load_state_dict(assigned, assign=True)
    assert torch.equal(fmodel.body.bias, assigned["body.bias"])
    assert len(list(fmodel.parameters(time=2))) == 6
    fmodel(x).sum().backward()
    _assert_unchanged(model, before)


def test_load_state_dict_on_make_functional_is_refused() -> None:
    fnet = hp.make_functional(nn.Linear(2, 1))
    with pytest.raises(hp.PatchError, match="no fast weights of its own"):
        fnet.load_state_dict({"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})


# ---- every nn.Module method that could write the original ----------------------------------


def _call(method: str) -> Callable[[nn.Module], Any]:
    calls: dict[str, Callable[[nn.Module], Any]] = {
        "zero_grad": lambda m: m.zero_grad(),
        "zero_grad(set_to_none=False)": lambda m: m.zero_grad(set_to_none=False),
        "submodule.zero_grad": lambda m: m.body.zero_grad(),
        "requires_grad_(False)": lambda m: m.requires_grad_(False),
        "submodule.requires_grad_(False)": lambda m: m.body.requires_grad_(False),
        "load_state_dict": lambda m: m.load_state_dict(
            {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
        ),
        "train/eval": lambda m: m.eval().train(),
        "apply(eval)": lambda m: m.apply(lambda sub: sub.eval()),
        "register_buffer": lambda m: m.register_buffer("extra", torch.ones(1)),
        "register_parameter": lambda m: m.register_parameter(
            "extra", nn.Parameter(torch.ones(1, dtype=DT))
        ),
        "assign a new Parameter": lambda m: setattr(m, "extra", nn.Parameter(torch.ones(1))),
        "submodule.register_parameter": lambda m: m.body.register_parameter(
            "weight", nn.Parameter(torch.ones(4, 3, dtype=DT))
        ),
        "to_empty": lambda m: m.to_empty(device="cpu"),
        "share_memory": lambda m: m.share_memory(),
        "to(float32)": lambda m: m.to(torch.float32),
        "double": lambda m: m.double(),
        "half": lambda m: m.half(),
        "cpu": lambda m: m.cpu(),
        "type(float32)": lambda m: m.type(torch.float32),
        "submodule.float": lambda m: m.body.float(),
    }
    return calls[method]


SAFE = [
    "zero_grad",
    "zero_grad(set_to_none=False)",
    "submodule.zero_grad",
    "requires_grad_(False)",
    "submodule.requires_grad_(False)",
    "load_state_dict",
    "train/eval",
    "apply(eval)",
    "register_buffer",
]
REFUSED = [
    "register_parameter",
    "assign a new Parameter",
    "submodule.register_parameter",
    "to_empty",
    "share_memory",
    "to(float32)",
    "double",
    "half",
    "cpu",
    "type(float32)",
    "submodule.float",
]


@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize("method", SAFE + REFUSED)
def test_no_module_method_writes_the_original(copy_initial_weights: bool, method: str) -> None:
    model, x = _net(), _x()
    model(x).sum().backward()
    fmodel = hp.monkeypatch(model, copy_initial_weights=copy_initial_weights)
    fmodel(x).sum().backward()  # the fast weights (or, at time 0, the original's) have grads
    before = _snapshot(model)
    weights = fmodel.fast_params
    if method in REFUSED:
        with pytest.raises(hp.PatchError):
            _call(method)(fmodel)
        assert all(a is b for a, b in zip(fmodel.fast_params, weights))
        assert "extra" not in dict(torch.nn.Module.named_parameters(fmodel))
    else:
        _call(method)(fmodel)
    _assert_unchanged(model, before)
    # The functional module still works, and its gradients still reach the original's weights
    # where they should (copy_initial_weights=False, unless the weights were just replaced).
    out = fmodel(x, params=[p * 1.0 for p in fmodel.parameters()])
    assert out.shape == (6, 2)


def test_zero_grad_and_requires_grad_act_on_the_fast_weights() -> None:
    model, x = _net(), _x()
    fmodel = hp.monkeypatch(model)  # copied initial weights: leaves of the functional module
    fmodel(x).sum().backward()
    assert all(p.grad is not None for p in fmodel.parameters())
    fmodel.body.zero_grad()
    assert [p.grad is None for p in fmodel.parameters()] == [True, True] + [False] * 4
    fmodel.requires_grad_(False)
    assert not any(p.requires_grad for p in fmodel.parameters())
    assert len(list(fmodel.parameters(time=0))) == 6  # replaced in place: no new step
    fmodel.head.requires_grad_(True)
    assert [p.requires_grad for p in fmodel.parameters()] == [False] * 4 + [True, True]


# ---- pickle and torch.save ------------------------------------------------------------------


PICKLED: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "sequential": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        lambda: torch.randn(6, 3, dtype=DT),
    ),
    "module-level class": (Net, lambda: torch.randn(6, 3, dtype=DT)),
    "lstm": (lambda: nn.LSTM(3, 4, num_layers=2), lambda: torch.randn(5, 2, 3, dtype=DT)),
}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def _round_trip(fmodel: nn.Module, how: str) -> Any:
    if how == "pickle":
        return pickle.loads(pickle.dumps(fmodel))
    buffer = io.BytesIO()
    torch.save(fmodel, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", list(PICKLED))
@pytest.mark.parametrize("track", [True, False])
def test_pickle_round_trip_restores_fast_weights_history_and_buffers(
    how: str, name: str, track: bool
) -> None:
    make, data = PICKLED[name]
    torch.manual_seed(0)
    model, x = make().to(DT), data()
    fmodel = hp.monkeypatch(model, copy_initial_weights=False, track_higher_grads=track)
    for _ in range(2):  # two differentiable steps: the fast weights carry a graph
        loss = _first(fmodel(x)).pow(2).sum()
        grads = torch.autograd.grad(loss, fmodel.fast_params, create_graph=True)
        fmodel.fast_params = [p - 0.1 * g for p, g in zip(fmodel.fast_params, grads)]
    loaded = _round_trip(fmodel, how)
    assert type(loaded) is type(fmodel) and isinstance(loaded, type(model))
    assert len(loaded._higher_store.history) == len(fmodel._higher_store.history)
    for time in (0, -1):
        for a, b in zip(loaded.parameters(time=time), fmodel.parameters(time=time)):
            assert torch.equal(a, b) and a.is_leaf and a.requires_grad
    for (ka, a), (kb, b) in zip(loaded.named_buffers(), fmodel.named_buffers()):
        assert ka == kb and torch.equal(a, b)
    torch.testing.assert_close(_first(loaded(x)), _first(fmodel(x)), rtol=0, atol=0)
    # It keeps working: a differentiable step, and gradients reach the weights it loaded.
    start = loaded.fast_params
    loss = _first(loaded(x)).pow(2).sum()
    grads = torch.autograd.grad(loss, start, create_graph=True)
    loaded.fast_params = [p - 0.1 * g for p, g in zip(start, grads)]
    _first(loaded(x)).sum().backward()
    assert all(p.grad is not None for p in start)


def test_pickle_of_make_functional_a_submodule_and_a_refusal() -> None:
    stateless = hp.make_functional(nn.Linear(3, 2).to(DT))
    loaded = pickle.loads(pickle.dumps(stateless))
    w, b = torch.ones(2, 3, dtype=DT), torch.zeros(2, dtype=DT)
    assert torch.equal(loaded(torch.ones(1, 3, dtype=DT), params=[w, b]), torch.full((1, 2), 3.0))
    with pytest.raises(hp.PatchError, match="no fast weights"):
        loaded(torch.ones(1, 3, dtype=DT))

    fmodel = hp.monkeypatch(_net())
    head = pickle.loads(pickle.dumps(fmodel.head))  # a functional module of that part alone
    assert isinstance(head, hp.FunctionalModule) and isinstance(head, nn.Linear)
    assert [torch.equal(a, b) for a, b in zip(head.parameters(), fmodel.head.parameters())] == [
        True,
        True,
    ]

    param = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="state_dict"):  # torch's own refusal says what to use
        pickle.dumps(hp.monkeypatch(param))
