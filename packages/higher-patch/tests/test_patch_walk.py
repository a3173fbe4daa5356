"""The one walk a functional module is made from lists a tree as its own methods do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import higher.patch
from higher.patch._walk import walk


class Tied(nn.Module):
    """A shared submodule, a tied weight, a None parameter, buffer and child."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(3, 3)
        self.a = nn.Sequential(shared, nn.BatchNorm1d(3), nn.Tanh())
        self.b = shared
        self.head = nn.Linear(3, 3, bias=False)
        self.head.weight = shared.weight  # tied
        self.register_parameter("missing", None)
        self.register_buffer("nothing", None)
        self.register_buffer("scale", torch.ones(3))
        self.gone = None  # a child set to None
        self._modules["gone"] = None


class Reversed(nn.Linear):
    """Lists its parameters its own way, last first (the walk must follow it)."""

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from reversed(list(super().named_parameters(prefix, recurse, remove_duplicate)))


def _models() -> dict[str, nn.Module]:
    return {
        "tied": Tied(),
        "deep": nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1)))),
        "lstm": nn.LSTM(3, 4, num_layers=2),
        "own listing inside": nn.Sequential(Reversed(2, 2), nn.Linear(2, 1)),
        "own listing": Reversed(2, 2),
    }


@pytest.mark.parametrize("name", sorted(_models()))
def test_the_walk_lists_what_the_modules_own_methods_list(name: str) -> None:
    model = _models()[name]
    tree = walk(model)
    assert tree.modules == list(model.modules())
    assert [id(p) for p in tree.params] == [id(p) for p in model.parameters()]
    assert tree.names == [n for n, _ in model.named_parameters()]
    assert [id(b) for b in tree.buffers] == [id(b) for b in model.buffers()]
    fmodel = higher.patch.monkeypatch(model)
    assert list(fmodel.named_fast_params()) == tree.names


class Hiding(nn.Module):
    """Lists its parameters its own way, leaving one out."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.gain = nn.Parameter(torch.ones(1))

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not name.endswith("gain"):
                yield name, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.gain
        return out


def test_a_parameter_the_model_does_not_list_is_refused_by_name() -> None:
    """It has no fast weight: refused with what to do (it was a bare KeyError)."""
    model = Hiding()
    with pytest.raises(higher.patch.PatchError, match=r"Hiding holds a parameter 'gain'.*buffer"):
        higher.patch.monkeypatch(model)
    # inside another module the root's listing counts, and torch's lists every parameter
    inside = nn.Sequential(Hiding())
    assert (
        list(higher.patch.monkeypatch(inside).named_fast_params())
        == [n for n, _ in inside.named_parameters()]
        == ["0.gain", "0.lin.weight", "0.lin.bias"]
    )
    assert [n for n, _ in model.named_parameters()] == ["lin.weight", "lin.bias"]  # untouched
