"""higher.utils: the 0.2.1 helpers, with the behaviour code that imported them relies on."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from higher import utils


class Pair(NamedTuple):
    a: int
    b: int


def test_flatten_orders_leaves_of_nested_containers() -> None:
    assert utils.flatten([1, (2, [3, {"k": 4, "j": (5,)}]), 6]) == [1, 2, 3, 4, 5, 6]
    assert utils.flatten(7) == [7]
    assert utils.flatten({"a": [], "b": [8]}) == [8]


def test_recursive_map_keeps_container_types() -> None:
    out = utils._recursive_map({"x": [1, (2, Pair(3, 4))], "y": {5}}, lambda v: v * 10)
    assert out == {"x": [10, (20, Pair(30, 40))], "y": {50}}
    assert isinstance(out["x"][1][1], Pair)


def test_is_container() -> None:
    empty: list[object] = [[], (), {}, set()]
    assert all(utils._is_container(c) for c in empty)
    assert not any(utils._is_container(c) for c in (1, "ab", torch.zeros(2)))


def test_copy_helpers_detach_keep_requires_grad_and_cast() -> None:
    t = torch.ones(2, requires_grad=True) * 2  # non-leaf
    safe = utils._copy_tensor(t, safe_copy=True)
    shared = utils._copy_tensor(t, safe_copy=False)
    assert safe.is_leaf and safe.requires_grad
    assert safe.data_ptr() != t.data_ptr() and shared.data_ptr() == t.data_ptr()
    nested = utils._recursive_copy_and_cast({"w": [t, 3]}, torch.device("meta"))
    assert nested["w"][0].device.type == "meta" and nested["w"][1] == 3


def test_param_lookup_and_mapping_resolve_tied_weights() -> None:
    enc, dec = nn.Linear(3, 3), nn.Linear(3, 3)
    dec.weight = enc.weight
    model = nn.Sequential(enc, dec)
    seen: list[torch.Tensor] = []
    mapping = utils._get_param_mapping(model, seen, [])
    assert mapping == [0, 1, 0, 2]
    assert [id(p) for p in seen] == [id(p) for p in model.parameters()]
    assert utils._find_param_in_list(dec.bias, seen) == 2
    assert utils._find_param_in_list(torch.zeros(3), seen) is None


def test_get_func_params_copies_or_shares() -> None:
    lin = nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    w, b = utils.get_func_params(lin)
    assert w is not lin.weight and torch.equal(w, lin.weight)
    assert w.requires_grad and not b.requires_grad
    (w2, _) = utils.get_func_params(lin, safe_copy=False)
    assert w2.data_ptr() == lin.weight.data_ptr()
