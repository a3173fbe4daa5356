# mypy: disable-error-code="attr-defined,union-attr,index,operator,arg-type"
# (the 0.2.1 names are private, outside the packages' __all__ and typed loosely on purpose)
"""Every name of higher 0.2.1's modules imports, and does what it did in 0.2.1.

Published programs import 0.2.1's underscore names too (`from higher.optim import _add`), so every
module-level name of 0.2.1's `higher`, `higher.optim`, `higher.patch` and `higher.utils` must
import -- under `-W error` as well -- and keep its 0.2.1 meaning, checked here with real values.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import typing
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher
import higher.optim
import higher.patch
import higher.utils

DT = torch.float64

# The module-level names of higher 0.2.1 (PyPI, July 2020), reconstructed from its API docs
# (docs/toplevel.rst, optim.rst, patch.rst, utils.rst: `automodule :members:` of each module) and
# from the source listing of higher/__init__.py, optim.py, patch.py and utils.py of
# facebookresearch/higher at that release. Left out: the aliases under which 0.2.1 imported the
# standard modules and its siblings (`_torch`, `_typing`, `_abc`, `_collections`, `_copy`,
# `_math`, `_warnings`, `_weakref`, `_OrderedDict`, `_contextmanager`, `_patch`, `_utils`) and
# the TypeVars `_T`, `_U` of utils.py: they are other libraries' objects, not 0.2.1's API.
HIGHER_021 = [
    "innerloop_ctx",
    "monkeypatch",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "patch",
    "optim",
    "utils",
]
OPTIM_021 = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "_GroupedGradsType",
    "_StateType",
    "_GradClosureType",
    "_OverrideType",
    "_GradCallbackType",
    "_get_mask_closure",
    "_maybe_mask",
    "_OptMappingType",
    "_opt_mapping",
    "_add",
    "_addcdiv",
    "_addcmul",
    "_recursive_apply",
]
PATCH_021 = [
    "monkeypatch",
    "make_functional",
    "buffer_sync",
    "_internal_attrs",
    "_BufferType",
    "_modify_internally",
    "_patched_parameters",
    "_MonkeyPatchBase",
    "_ParameterPlaceholder",
    "_make_functional",
    "_update_patched_params",
    "_EncapsulatorType",
]
UTILS_021 = [
    "flatten",
    "get_func_params",
    "_copy_tensor",
    "_recursive_copy_and_cast",
    "_recursive_map",
    "_is_container",
    "_find_param_in_list",
    "_get_param_mapping",
]
MODULES_021 = {
    "higher": HIGHER_021,
    "higher.optim": OPTIM_021,
    "higher.patch": PATCH_021,
    "higher.utils": UTILS_021,
}
IMPORTS = "\n".join(
    f"from {module} import {name}" for module, names in MODULES_021.items() for name in names
)
HELPER = "private higher 0.2.1 helper"
FILTER = f"ignore:{HELPER}:DeprecationWarning"


def test_every_021_name_imports_under_warnings_as_errors() -> None:
    code = IMPORTS + "\nprint('ok')"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_documented_filter_silences_the_deprecation_and_only_it() -> None:
    call = "import torch\nfrom higher.optim import _add\n_add(torch.ones(1), 2.0, torch.ones(1))"
    plain = subprocess.run([sys.executable, "-W", "error", "-c", call], capture_output=True)
    assert plain.returncode != 0 and b"DeprecationWarning: private higher 0.2.1" in plain.stderr
    args = [sys.executable, "-W", "error", "-W", FILTER, "-c", call]
    filtered = subprocess.run(args, capture_output=True, text=True, check=False)
    assert filtered.returncode == 0, filtered.stderr


def test_the_021_names_stay_out_of_all() -> None:
    for module, names in MODULES_021.items():
        exported = set(getattr(sys.modules[module], "__all__", ()))
        assert not [n for n in names if n.startswith("_") and n in exported], module


# ---- each name's 0.2.1 behaviour, with real values ----------------------------------------


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _deprecated(fn: Callable[[], typing.Any]) -> typing.Any:
    with pytest.warns(DeprecationWarning, match=HELPER):
        return fn()


def _w() -> torch.Tensor:
    return torch.tensor([1.0, -2.0, 3.0], dtype=DT, requires_grad=True)


def _quadratic(w: torch.Tensor) -> torch.Tensor:
    return (w**2 * torch.tensor([1.0, 2.0, 3.0], dtype=DT)).sum() + w.sum()


def _one_step_like_torch(torch_cls: type[torch.optim.Optimizer], **kw: object) -> None:
    """The twin's first two steps equal torch's, from the same start."""
    p = nn.Parameter(_w().detach().clone())
    opt = torch_cls([p], **kw)
    diffopt = higher.optim.get_diff_optim(opt, [p])
    params: list[torch.Tensor] = [p]
    for _ in range(2):
        params = diffopt.step(_quadratic(params[0]), params=params)
    for _ in range(2):
        opt.zero_grad()
        _quadratic(p).backward()
        opt.step()
    torch.testing.assert_close(params[0], p, rtol=1e-12, atol=1e-14)


def _check_innerloop_ctx() -> None:
    torch.manual_seed(0)
    model, x = nn.Linear(3, 1).to(DT), torch.randn(4, 3, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).sum())
        grads = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
        for new, p, g in zip(fmodel.parameters(), model.parameters(), grads):
            torch.testing.assert_close(new, p - 0.1 * g, rtol=1e-14, atol=1e-15)


def _check_monkeypatch(monkeypatch: Callable[..., nn.Module]) -> None:
    model, x = nn.Linear(3, 2).to(DT), torch.ones(2, 3, dtype=DT)
    fmodel = monkeypatch(model)
    _exact(fmodel(x), model(x))
    assert isinstance(fmodel, nn.Linear) and isinstance(fmodel, higher.patch._MonkeyPatchBase)


def _check_create_diff_optim() -> None:
    w = _w()
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.5}, params=[w])
    (new,) = diffopt.step(_quadratic(w), params=[w])
    grad = torch.autograd.grad(_quadratic(w), w)[0]
    _exact(new, w - 0.5 * grad)


class _RegisteredSGD(torch.optim.SGD):
    pass


def _check_register_optim() -> None:
    higher.register_optim(_RegisteredSGD, higher.optim.DifferentiableSGD)
    w = nn.Parameter(torch.ones(1))
    assert type(higher.get_diff_optim(_RegisteredSGD([w], lr=0.1), [w])).__name__ == (
        "DifferentiableSGD"
    )


def _check_get_diff_optim() -> None:
    w = nn.Parameter(torch.ones(1))
    diffopt = higher.get_diff_optim(torch.optim.Adam([w]), [w])
    assert isinstance(diffopt, higher.optim.DifferentiableAdam)
    assert isinstance(diffopt, higher.optim.DifferentiableOptimizer)


def _check_trainable_opt_params() -> None:
    w = nn.Parameter(torch.ones(1))
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.8, 0.9))
    hyper = higher.optim.get_trainable_opt_params(opt)
    assert hyper["lr"][0].requires_grad and hyper["lr"][0].item() == pytest.approx(0.1)
    higher.optim.apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.5)]})
    assert opt.param_groups[0]["lr"] == 0.5


def _check_mask_closure() -> None:
    mask = torch.tensor([True, False, True])
    hook = _deprecated(lambda: higher.optim._get_mask_closure(mask))
    assert callable(hook)
    _exact(hook(torch.tensor([4.0, 5.0, 6.0])), torch.tensor([0.0, 5.0, 0.0]))
    # at second order too: the masked gradient, when it needs grad, is masked again
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 1.0
    y.register_hook(hook)
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    _exact(g, torch.tensor([0.0, 12.0, 0.0]))
    (gg,) = torch.autograd.grad(g.sum(), x)
    _exact(gg, torch.tensor([0.0, 12.0, 0.0]))


def _check_maybe_mask() -> None:
    x = torch.ones(3, requires_grad=True)
    y = x * 1.0
    assert (
        _deprecated(lambda: higher.optim._maybe_mask(y, torch.tensor([False, True, False]))) is None
    )
    (3 * y).sum().backward()
    _exact(x.grad, torch.tensor([3.0, 0.0, 3.0]))
    _deprecated(lambda: higher.optim._maybe_mask(torch.ones(2), torch.tensor([True, True])))


def _check_add() -> None:
    t, u = torch.tensor([0.1, 0.7], dtype=torch.float32), torch.tensor([0.3, -1.9])
    _exact(_deprecated(lambda: higher.optim._add(t, 2.0, u)), t + 2.0 * u)
    _exact(_deprecated(lambda: higher.optim._add(t, u)), t + u)  # add(other)
    v = torch.tensor(-0.01, requires_grad=True)
    out = _deprecated(lambda: higher.optim._add(t, v, u))
    _exact(torch.autograd.grad(out.sum(), v)[0], u.sum())


def _check_addcdiv() -> None:
    t, a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.7]), torch.tensor([0.3, 1.1])
    _exact(_deprecated(lambda: higher.optim._addcdiv(t, -0.1, a, b)), t + -0.1 * (a / b))
    _exact(_deprecated(lambda: higher.optim._addcdiv(t, a, b)), t + a / b)


def _check_addcmul() -> None:
    t, a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.7]), torch.tensor([0.3, 1.1])
    _exact(_deprecated(lambda: higher.optim._addcmul(t, -0.1, a, b)), t + -0.1 * a * b)
    _exact(_deprecated(lambda: higher.optim._addcmul(t, a, b)), t + a * b)


def _check_opt_mapping() -> None:
    mapping = higher.optim._opt_mapping
    assert _deprecated(lambda: mapping[torch.optim.SGD]) is higher.optim.DifferentiableSGD
    assert torch.optim.Adam in list(mapping)

    class Mine(torch.optim.Adam):
        pass

    _deprecated(lambda: mapping.__setitem__(Mine, higher.optim.DifferentiableAdam))
    w = nn.Parameter(torch.ones(1))
    assert isinstance(higher.get_diff_optim(Mine([w]), [w]), higher.optim.DifferentiableAdam)
    _deprecated(lambda: mapping.__delitem__(Mine))
    with pytest.raises(KeyError), pytest.warns(DeprecationWarning, match=HELPER):
        mapping[Mine]


def _check_recursive_apply() -> None:
    apply = higher.optim._recursive_apply
    betas = (torch.tensor(0.5), torch.tensor(0.25))
    assert _deprecated(lambda: apply(betas, (0.9, 0.999))) == (0.5, 0.25)
    assert _deprecated(lambda: apply([torch.tensor(3.0)], [1])) == [3]
    target = torch.zeros(2)
    assert _deprecated(lambda: apply(torch.ones(2), target)) is target
    _exact(target, torch.ones(2))
    with pytest.raises(ValueError), pytest.warns(DeprecationWarning, match=HELPER):
        apply(0.5, 0.1)


def _check_type(alias: object, expected: object) -> None:
    assert alias == expected


def _check_modify_internally() -> None:
    fnet = higher.patch.monkeypatch(nn.Linear(2, 1).to(DT))
    before = fnet.fast_params
    with pytest.warns(DeprecationWarning, match=HELPER), higher.patch._modify_internally(fnet):
        fnet.bias = torch.full((1,), 5.0, dtype=DT)
    assert fnet.bias.item() == 5.0 and fnet.fast_params == before  # slot only, no history
    fnet.bias = torch.full((1,), 6.0, dtype=DT)  # outside: the fast weight itself
    assert fnet.fast_params[1].item() == 6.0


def _check_patched_parameters() -> None:
    fnet = higher.patch.monkeypatch(nn.Linear(2, 1).to(DT))
    first = fnet.fast_params
    fnet.fast_params = [p * 2 for p in first]
    got = _deprecated(lambda: list(higher.patch._patched_parameters(fnet, time=0)))
    assert all(a is b for a, b in zip(got, first))
    latest = _deprecated(lambda: list(higher.patch._patched_parameters(fnet)))
    assert all(a is b for a, b in zip(latest, fnet.fast_params))
    with (
        pytest.warns(UserWarning, match="recurse=False"),
        pytest.warns(DeprecationWarning, match=HELPER),
    ):
        higher.patch._patched_parameters(fnet, recurse=False)
    frozen = higher.patch.monkeypatch(nn.Linear(2, 1), track_higher_grads=False)
    with pytest.raises(ValueError), pytest.warns(DeprecationWarning, match=HELPER):
        higher.patch._patched_parameters(frozen, time=1)


class _Tied(nn.Module):
    """A shared submodule and a tied weight: 0.2.1 counted a slot at each place."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.shared = nn.Linear(3, 3)
        self.blocks = nn.ModuleList([self.shared, nn.Tanh(), self.shared])
        self.out = nn.Linear(3, 3)
        self.out.weight = self.inp.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.out(h)
        return out


def _check_make_functional() -> None:
    torch.manual_seed(0)
    model, x = _Tied().to(DT), torch.randn(2, 3, dtype=DT)
    box: list[list[torch.Tensor] | None] = [None]
    made: typing.Any = _deprecated(lambda: higher.patch._make_functional(model, box, 3))
    end, fmodule, cls = made
    assert type(fmodule) is cls and cls._wrapped_name == "_Tied"
    assert isinstance(fmodule, _Tied) and isinstance(fmodule, higher.patch._MonkeyPatchBase)
    names = [n for n, _ in model.named_parameters()]  # inp.w, inp.b, shared.w, shared.b, out.b
    unique = [torch.randn_like(p) for p in model.parameters()]
    # slots: inp (w, b), shared (w, b), blocks.0 = shared, blocks.2 = shared, out (w = inp.w, b)
    slots = [unique[i] for i in (0, 1, 2, 3, 2, 3, 2, 3, 0, 4)]
    assert end == 3 + len(slots)
    box[0] = [torch.zeros(1)] * 3 + slots
    expected = functional_call(model, dict(zip(names, unique)), (x,))
    _exact(fmodule(x), expected)
    box[0] = None  # no box: weights come with the call, one per parameter
    _exact(fmodule(x, params=unique), expected)
    with pytest.raises(ValueError, match="no fast weights"):
        fmodule(x)
    other = higher.patch.monkeypatch(model)  # the class made for that call is its own
    assert type(other) is not cls and not hasattr(type(other), "_wrapped_name")


def _check_update_patched_params() -> None:
    torch.manual_seed(0)
    model, x = _Tied().to(DT), torch.randn(2, 3, dtype=DT)
    fmodel = higher.patch.monkeypatch(model)
    unique = [torch.randn_like(p) for p in model.parameters()]
    slots = [unique[i] for i in (0, 1, 2, 3, 2, 3, 2, 3, 0, 4)]
    update = higher.patch._update_patched_params
    end = _deprecated(lambda: update(fmodel, [[torch.zeros(1), *slots]], 1))
    assert end == 11
    names = [n for n, _ in model.named_parameters()]
    _exact(fmodel(x), functional_call(model, dict(zip(names, unique)), (x,)))
    assert len(list(fmodel.parameters(time=0))) == 5  # the history is as it was


def _check_buffer_sync() -> None:
    bn = nn.BatchNorm1d(2).to(DT)
    fbn = higher.patch.monkeypatch(bn)
    bn(torch.randn(5, 2, dtype=DT) + 3)
    higher.patch.buffer_sync(bn, fbn)
    _exact(fbn.running_mean, bn.running_mean)
    assert fbn.running_mean is not bn.running_mean


def _check_make_functional_public() -> None:
    fnet = higher.patch.make_functional(nn.Linear(2, 1).to(DT))
    params = [torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT)]
    out = fnet(torch.ones(1, 2, dtype=DT), params=params)
    _exact(out, torch.full((1, 1), 3.0, dtype=DT))


def _check_utils_copy_tensor() -> None:
    t = torch.ones(2, requires_grad=True)
    safe = higher.utils._copy_tensor(t, True)
    shared = higher.utils._copy_tensor(t, False)
    assert safe.requires_grad and safe.is_leaf and safe.data_ptr() != t.data_ptr()
    assert shared.requires_grad and shared.data_ptr() == t.data_ptr()


def _check_recursive_copy_and_cast() -> None:
    t = torch.ones(2, requires_grad=True) * 2
    out = higher.utils._recursive_copy_and_cast({"a": [t, 3], "b": (t,)}, None)
    assert out["a"][1] == 3 and isinstance(out["b"], tuple)
    _exact(out["a"][0], t.detach())
    assert out["a"][0].is_leaf and out["a"][0].requires_grad


def _check_recursive_map() -> None:
    out = higher.utils._recursive_map({"a": [1, (2, 3)], "b": {4}}, lambda v: v * 10)
    assert out == {"a": [10, (20, 30)], "b": {40}}


def _check_get_param_mapping() -> None:
    model = _Tied()
    assert higher.utils._get_param_mapping(model, [], []) == [0, 1, 2, 3, 2, 3, 2, 3, 0, 4]


_CONTAINER_PROBES: list[object] = [[], (), {}, set(), torch.ones(1), "s"]


def _params() -> list[torch.Tensor]:
    return [torch.ones(1), torch.ones(1), torch.ones(1)]


CHECKS: dict[str, Callable[[], None]] = {
    "higher.innerloop_ctx": _check_innerloop_ctx,
    "higher.monkeypatch": lambda: _check_monkeypatch(higher.monkeypatch),
    "higher.get_diff_optim": _check_get_diff_optim,
    "higher.create_diff_optim": _check_create_diff_optim,
    "higher.register_optim": _check_register_optim,
    "higher.patch": lambda: _check_type(higher.patch.__name__, "higher.patch"),
    "higher.optim": lambda: _check_type(higher.optim.__name__, "higher.optim"),
    "higher.utils": lambda: _check_type(higher.utils.__name__, "higher.utils"),
    "higher.optim.DifferentiableOptimizer": _check_get_diff_optim,
    "higher.optim.DifferentiableSGD": lambda: _one_step_like_torch(
        torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "higher.optim.DifferentiableAdam": lambda: _one_step_like_torch(
        torch.optim.Adam, lr=0.1, amsgrad=True, weight_decay=0.01
    ),
    "higher.optim.DifferentiableAdadelta": lambda: _one_step_like_torch(
        torch.optim.Adadelta, lr=0.5, weight_decay=0.01
    ),
    "higher.optim.DifferentiableAdagrad": lambda: _one_step_like_torch(
        torch.optim.Adagrad, lr=0.1, lr_decay=0.01
    ),
    "higher.optim.DifferentiableAdamax": lambda: _one_step_like_torch(torch.optim.Adamax, lr=0.1),
    "higher.optim.DifferentiableASGD": lambda: _one_step_like_torch(
        torch.optim.ASGD, lr=0.1, t0=1.0
    ),
    "higher.optim.DifferentiableRMSprop": lambda: _one_step_like_torch(
        torch.optim.RMSprop, lr=0.01, momentum=0.5, centered=True
    ),
    "higher.optim.DifferentiableRprop": lambda: _one_step_like_torch(torch.optim.Rprop, lr=0.1),
    "higher.optim.get_diff_optim": _check_get_diff_optim,
    "higher.optim.create_diff_optim": _check_create_diff_optim,
    "higher.optim.register_optim": _check_register_optim,
    "higher.optim.get_trainable_opt_params": _check_trainable_opt_params,
    "higher.optim.apply_trainable_opt_params": _check_trainable_opt_params,
    "higher.optim._GroupedGradsType": lambda: _check_type(
        higher.optim._GroupedGradsType,
        typing.List[typing.List[torch.Tensor]],  # noqa: UP006
    ),
    "higher.optim._StateType": lambda: _check_type(
        higher.optim._StateType,
        typing.List[typing.DefaultDict[int, typing.Any]],  # noqa: UP006
    ),
    "higher.optim._GradClosureType": lambda: _check_type(
        higher.optim._GradClosureType, typing.Callable[[torch.Tensor], torch.Tensor]
    ),
    "higher.optim._OverrideType": lambda: _check_type(
        higher.optim._OverrideType,
        typing.Dict[str, typing.List[typing.Any]],  # noqa: UP006
    ),
    "higher.optim._GradCallbackType": lambda: _check_type(
        higher.optim._GradCallbackType,
        typing.Callable[[typing.List[torch.Tensor]], typing.List[torch.Tensor]],  # noqa: UP006
    ),
    "higher.optim._OptMappingType": lambda: _check_type(
        typing.get_args(higher.optim._OptMappingType),
        (
            typing.Type[torch.optim.Optimizer],  # noqa: UP006
            typing.Type[higher.optim.DifferentiableOptimizer],  # noqa: UP006
        ),
    ),
    "higher.optim._get_mask_closure": _check_mask_closure,
    "higher.optim._maybe_mask": _check_maybe_mask,
    "higher.optim._opt_mapping": _check_opt_mapping,
    "higher.optim._add": _check_add,
    "higher.optim._addcdiv": _check_addcdiv,
    "higher.optim._addcmul": _check_addcmul,
    "higher.optim._recursive_apply": _check_recursive_apply,
    "higher.patch.monkeypatch": lambda: _check_monkeypatch(higher.patch.monkeypatch),
    "higher.patch.make_functional": _check_make_functional_public,
    "higher.patch.buffer_sync": _check_buffer_sync,
    "higher.patch._internal_attrs": lambda: _check_type(
        sorted(higher.patch._internal_attrs),
        sorted(
            {"_backend", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks"}
            | {"_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"}
            | {"_modules"}
        ),
    ),
    "higher.patch._BufferType": lambda: _check_type(
        higher.patch._BufferType,
        typing.Dict[str, typing.Optional[torch.Tensor]],  # noqa: UP006, UP045
    ),
    "higher.patch._modify_internally": _check_modify_internally,
    "higher.patch._patched_parameters": _check_patched_parameters,
    "higher.patch._MonkeyPatchBase": lambda: _check_monkeypatch(higher.monkeypatch),
    "higher.patch._ParameterPlaceholder": lambda: _check_type(
        repr(higher.patch._ParameterPlaceholder("bias")), 'Parameter placeholder ("bias")'
    ),
    "higher.patch._make_functional": _check_make_functional,
    "higher.patch._update_patched_params": _check_update_patched_params,
    "higher.patch._EncapsulatorType": lambda: _check_type(
        higher.patch._EncapsulatorType,
        typing.Optional[  # noqa: UP045
            typing.Callable[[higher.patch._MonkeyPatchBase, nn.Module], None]
        ],
    ),
    "higher.utils.flatten": lambda: _check_type(
        higher.utils.flatten({"a": [1, (2, {3})], "b": 4}), [1, 2, 3, 4]
    ),
    "higher.utils.get_func_params": lambda: _check_type(
        [(p.is_leaf, p.requires_grad) for p in higher.utils.get_func_params(nn.Linear(2, 1))],
        [(True, True), (True, True)],
    ),
    "higher.utils._copy_tensor": _check_utils_copy_tensor,
    "higher.utils._recursive_copy_and_cast": _check_recursive_copy_and_cast,
    "higher.utils._recursive_map": _check_recursive_map,
    "higher.utils._is_container": lambda: _check_type(
        [higher.utils._is_container(v) for v in _CONTAINER_PROBES],
        [True, True, True, True, False, False],
    ),
    "higher.utils._find_param_in_list": lambda: _check_type(
        [higher.utils._find_param_in_list(p, ps) for ps in [_params()] for p in [ps[1], _w()]],
        [1, None],
    ),
    "higher.utils._get_param_mapping": _check_get_param_mapping,
}


QUALIFIED = [f"{module}.{name}" for module, names in MODULES_021.items() for name in names]


def test_every_021_name_has_a_behaviour_check() -> None:
    assert sorted(CHECKS) == sorted(QUALIFIED)
    assert len(collections.Counter(QUALIFIED)) == len(QUALIFIED)


@pytest.mark.parametrize("qualified", QUALIFIED)
def test_each_021_name_keeps_its_meaning(qualified: str) -> None:
    module, _, name = qualified.rpartition(".")
    assert hasattr(sys.modules[module], name), f"{qualified} is missing"
    CHECKS[qualified]()


def test_sgd_rounds_as_torch_sgd_not_as_021() -> None:
    # docs/migration-from-higher-0.2.md, "Why runs drift from 0.2.1's": the figures there.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = torch.randn(128, 20), torch.randn(128, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    old = _deprecated(
        lambda: [higher.optim._add(p, -0.1, g) for p, g in zip(opt_params(opt), grads)]
    )
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        ours = [p.detach() for p in fmodel.fast_params]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
    for a, p in zip(ours, model.parameters()):
        assert torch.equal(a, p)  # bitwise: one rounding, as torch.optim.SGD
    # 0.2.1's extra rounding (of lr * g) moves a result by at most about one unit in the last
    # place of its terms (how many entries move depends on the CPU's add kernel: 17 of 1409
    # here, by at most 1.5e-8)
    eps = torch.finfo(torch.float32).eps
    for a, p, g in zip(old, model.parameters(), grads):
        bound = eps * (p.detach().abs() + (0.1 * g).abs())
        assert bool(((a - p).abs() <= bound).all())


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]
