# mypy: disable-error-code="union-attr,index,operator,arg-type,no-untyped-call,call-overload"
# (tests poke at dynamic module attributes, which torch types as `Tensor | Module`; torch leaves
# Module.__getstate__/__setstate__ untyped)
"""`monkeypatch` copies what `copy.deepcopy` copies: the class's own copy protocol is honoured.

A module that `copy.deepcopy` can copy (its `__getstate__` drops a lock or a file handle, its
`__deepcopy__` or `__reduce_ex__` rebuilds something, its `__setstate__` recomputes a derived
value) can be patched, the functional module computes the original's forward, and the original
is untouched. The same holds for `copy.deepcopy(fmodel)` and `pickle`.
"""

from __future__ import annotations

import copy
import copyreg
import io
import itertools
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import higher.patch as hp

DT = torch.float64


class WithLock(nn.Module):
    """Holds a lock (it cannot be deep-copied): `__getstate__` drops it, `__setstate__` adds one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        del state["lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            out: torch.Tensor = self.fc(x)
        return out


class WithFile(nn.Module):
    """Holds an open log file: the state keeps its path, `__setstate__` opens it again."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.log = open(path)  # noqa: SIM115  (held open on purpose)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state["log"] = self.log.name
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.log = open(state["log"])  # noqa: SIM115

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


class WithDeepcopy(nn.Module):
    """Its own `__deepcopy__`: the copy starts an empty cache and counts its generation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.cache: dict[str, Any] = {"stale": object()}
        self.generation = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> WithDeepcopy:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "cache":
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["cache"] = {}
        new.__dict__["generation"] = self.generation + 1
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


class WithReduceEx(nn.Module):
    """Its own `__reduce_ex__`: rebuilt through the constructor, which starts a new stream."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 2)
        self.stream: Iterator[int] = (i for i in itertools.count())  # cannot be copied

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "stream"}
        return (type(self), (self.width,), state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


class WithSetstate(nn.Module):
    """`__getstate__` drops a derived tensor; `__setstate__` rebuilds it and counts rebuilds."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 2)
        self.basis = torch.linspace(0.5, 1.5, width, dtype=DT)
        self.rebuilt = 0

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        del state["basis"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.basis = torch.linspace(0.5, 1.5, self.width, dtype=DT)
        self.rebuilt += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x * self.basis)
        return out


class WithCopy(nn.Module):
    """Its own `__copy__` (what `copy.copy` of the functional module calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.copies = 0

    def __copy__(self) -> WithCopy:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__["copies"] = self.copies + 1
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


class WithCopyreg(nn.Module):
    """Copied through a reducer registered with `copyreg` (no copy method of its own): the
    reducer counts the copies."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.copies = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def _new_with_copyreg() -> WithCopyreg:
    return WithCopyreg.__new__(WithCopyreg)


def _reduce_with_copyreg(module: WithCopyreg) -> tuple[Any, ...]:
    state = dict(module.__getstate__(), copies=module.copies + 1)
    return _new_with_copyreg, (), state


copyreg.pickle(WithCopyreg, _reduce_with_copyreg)


class Wrapper(nn.Module):
    """The protocol modules as submodules, so their protocol runs inside the tree copy too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.inner(x)))
        return out


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "log.txt"
    path.write_text("a log line\n")
    return path


def _build(kind: str, log_path: Path) -> nn.Module:
    torch.manual_seed(0)
    makers: dict[str, Callable[[], nn.Module]] = {
        "lock": WithLock,
        "file": lambda: WithFile(log_path),
        "deepcopy": WithDeepcopy,
        "reduce_ex": lambda: WithReduceEx(3),
        "setstate": lambda: WithSetstate(3),
        "copyreg": WithCopyreg,
    }
    return makers[kind]().to(DT)


KINDS = ["lock", "file", "deepcopy", "reduce_ex", "setstate", "copyreg"]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _check_protocol_effect(kind: str, model: nn.Module, copied: nn.Module) -> None:
    """What the class's own protocol did to the copy (and did not do to the original)."""
    if kind == "lock":
        assert isinstance(copied.lock, type(model.lock)) and copied.lock is not model.lock
        assert not model.lock.locked()
    elif kind == "file":
        assert copied.log is not model.log and copied.log.name == model.log.name
        assert copied.log.readline() == "a log line\n"
        assert not model.log.closed
    elif kind == "deepcopy":
        assert copied.cache == {} and "stale" in model.cache
        assert copied.generation == model.generation + 1
    elif kind == "reduce_ex":
        assert next(copied.stream) == 0  # a new stream, whatever the original's has given
    elif kind == "setstate":
        assert torch.equal(copied.basis, model.basis) and copied.basis is not model.basis
        assert copied.rebuilt > model.rebuilt
    elif kind == "copyreg":
        assert copied.copies > model.copies


def _close_files(*modules: nn.Module) -> None:
    for m in modules:
        for sub in m.modules():
            log = sub.__dict__.get("log")
            if isinstance(log, io.IOBase):
                log.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nested", [False, True], ids=["root", "submodule"])
def test_monkeypatch_honours_the_class_copy_protocol(
    kind: str, nested: bool, log_path: Path
) -> None:
    inner = _build(kind, log_path)
    model = Wrapper(inner).to(DT) if nested else inner
    if kind == "reduce_ex":
        assert next(inner.stream) == 0  # the original's stream has moved on
    x = torch.randn(4, 3, dtype=DT)
    before = _snapshot(model)
    reference = copy.deepcopy(model)  # what copy.deepcopy makes of it
    opened = [model, reference]
    try:
        fmodel = hp.monkeypatch(model, copy_initial_weights=False)
        opened.append(fmodel)
        finner = fmodel.inner if nested else fmodel
        _check_protocol_effect(kind, inner, finner)
        if kind == "setstate":
            assert finner.rebuilt == inner.rebuilt + 1  # once, as copy.deepcopy does
        if kind == "copyreg":
            assert finner.copies == inner.copies + 1  # the reducer, once
        assert isinstance(fmodel, type(model)) and isinstance(finner, type(inner))
        torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)
        shifted = [p + 0.25 for p in fmodel.parameters()]
        reference_out = torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], shifted)), (x,)
        )
        torch.testing.assert_close(fmodel(x, params=shifted), reference_out, rtol=0, atol=0)
        # Gradients reach the original (copy_initial_weights=False): its weights are the first
        # fast weights, whatever object the class's protocol built around them.
        fmodel(x, params=shifted).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        _assert_same(model, before)
        assert sorted(reference.state_dict()) == sorted(fmodel.state_dict())
    finally:
        _close_files(*opened)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_and_pickle_of_the_functional_module_honour_the_protocol(
    kind: str, log_path: Path
) -> None:
    model = _build(kind, log_path)
    x = torch.randn(4, 3, dtype=DT)
    fmodel = hp.monkeypatch(model)
    copies: list[nn.Module] = []
    try:
        fmodel(x, params=[p * 1.5 for p in fmodel.parameters()])
        expected = fmodel(x)
        if kind == "deepcopy":
            fmodel.cache = {"stale": object()}
        copies.append(copy.deepcopy(fmodel))
        if kind != "file":  # pickling copies it first: a file opened there would stay open
            copies.append(pickle.loads(pickle.dumps(fmodel)))
        if kind == "reduce_ex":
            assert next(fmodel.stream) == 0  # the functional module's stream moves on
        for copied in copies:
            assert type(copied) is type(fmodel)
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
            assert copied.fast_params[0] is not fmodel.fast_params[0]
            _check_protocol_effect(kind, fmodel, copied)
    finally:
        _close_files(model, fmodel, *copies)


def test_copy_copy_of_a_functional_module_uses_the_class_copy() -> None:
    torch.manual_seed(0)
    model = WithCopy().to(DT)
    fmodel = hp.monkeypatch(model)
    shallow = copy.copy(fmodel)
    assert shallow.copies == 1 and type(shallow) is type(fmodel)
    x = torch.randn(2, 3, dtype=DT)
    torch.testing.assert_close(shallow(x), fmodel(x), rtol=0, atol=0)


class SelfCopy(nn.Module):
    """A `__deepcopy__` that returns the module itself: no copy to own, so refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> SelfCopy:
        return self


class Reshaping(nn.Module):
    """A `__deepcopy__` whose copy has another structure than the module: refused."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        if extra:
            self.more = nn.Linear(1, 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> Reshaping:
        return Reshaping(extra=True)


@pytest.mark.parametrize(
    ("cls", "message"),
    [(SelfCopy, "returns the module itself"), (Reshaping, "does not have the module's structure")],
)
def test_a_copy_protocol_without_a_usable_copy_is_refused(
    cls: type[nn.Module], message: str
) -> None:
    model = cls()
    before = _snapshot(model)
    with pytest.raises(hp.PatchError, match=message):
        hp.monkeypatch(model)
    _assert_same(model, before)
    assert type(model) is cls
    assert "_higher_store" not in model.__dict__


def test_a_state_key_that_is_not_a_str_is_copied_as_deepcopy_copies_it() -> None:
    """A module whose `__dict__` holds a key that is not a `str`, after attributes already
    copied: the copy is `copy.deepcopy`'s (the key and its value copied, a list two
    attributes share stays one list, the submodule copied once)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh()).to(DT)
    shared = [1, 2]
    model.__dict__["first"] = shared  # (what nn.Module's setattr does with a list)
    model.__dict__[7] = {"seven": [7]}  # a non-str key (set through the dict: setattr refuses)
    model.__dict__["second"] = shared
    fmodel = hp.monkeypatch(model)
    reference = copy.deepcopy(model)
    assert fmodel.__dict__[7] == reference.__dict__[7] == {"seven": [7]}
    assert fmodel.__dict__[7] is not model.__dict__[7]
    copied = fmodel.__dict__["first"]
    assert copied == [1, 2] and copied is fmodel.__dict__["second"]
    assert copied is not shared
    assert fmodel[0] is not model[0] and fmodel._modules["0"] is fmodel[0]
    x = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(fmodel(x), model(x), rtol=0, atol=0)
