# mypy: disable-error-code="union-attr,index,operator,arg-type"
# (tests poke at dynamic module attributes, which torch types as `Tensor | Module`)
"""The functional module's contract: history, copying, hooks, attributes, buffers, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher.patch as hp


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.body(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 3, dtype=torch.float64)


def _shifted(params: list[torch.Tensor], by: float) -> list[torch.Tensor]:
    return [p + by for p in params]


def _reference(net: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    out: torch.Tensor = functional_call(net, {**dict(zip(names, params)), **buffers}, (x,))
    return out


# ---- identity and history ------------------------------------------------------------------


def test_is_an_instance_of_the_user_class_and_leaves_the_original_untouched(net: Net) -> None:
    before = {n: p.clone() for n, p in net.state_dict().items()}
    fnet = hp.monkeypatch(net)
    assert isinstance(fnet, Net)
    assert isinstance(fnet, hp.FunctionalModule)
    assert type(fnet).__name__ == "FunctionalNet"
    assert isinstance(fnet.body[0], nn.Linear)
    fnet(torch.randn(4, 3, dtype=torch.float64), params=_shifted(fnet.fast_params, 1.0))
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(type(p) is nn.Parameter for p in net.parameters())


def test_history_by_time(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net)
    p0 = fnet.fast_params
    p1 = _shifted(p0, 0.1)
    fnet(x, params=p1)
    p2 = _shifted(p0, 0.2)
    fnet.fast_params = p2
    assert [list(fnet.parameters(time=t)) for t in range(3)] == [p0, p1, p2]
    assert list(fnet.parameters()) == p2 == fnet.fast_params
    assert list(fnet.parameters(time=-2)) == p1
    assert fnet.init_fast_params == p0
    assert fnet.named_fast_params(time=1) == dict(zip([n for n, _ in net.named_parameters()], p1))
    with pytest.raises(hp.PatchError, match=r"time=3 is out of range: 3 step\(s\).*-3\.\.2"):
        fnet.parameters(time=3)


def test_update_params_sets_the_current_weights(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net)
    new = _shifted(fnet.fast_params, 0.3)
    fnet.update_params(new)
    assert fnet.fast_params == new
    torch.testing.assert_close(fnet(x), _reference(net, new, x))


def test_not_tracking_keeps_only_the_current_weights(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net, track_higher_grads=False)
    assert fnet.track_higher_grads is False
    new = _shifted(fnet.fast_params, 0.1)
    fnet(x, params=new)
    assert list(fnet.parameters(time=0)) == new == list(fnet.parameters(time=-1))
    with pytest.raises(hp.PatchError, match="only the current fast weights"):
        fnet.parameters(time=1)
    with pytest.raises(hp.PatchError, match="init_fast_params is not kept"):
        _ = fnet.init_fast_params
    fnet.track_higher_grads = True
    fnet.fast_params = _shifted(new, 0.1)
    assert len(list(fnet.parameters(time=1))) == len(new)
    with pytest.raises(ValueError, match="track_higher_grads must be a bool, got int"):
        fnet.track_higher_grads = 1  # type: ignore[assignment]


# ---- initial weights and gradients -----------------------------------------------------------


def test_copy_initial_weights_true_detaches_from_the_module(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net, copy_initial_weights=True)
    for p, q in zip(net.parameters(), fnet.fast_params):
        assert q is not p and q.is_leaf and q.requires_grad and torch.equal(p, q)
    fnet(x).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(q.grad is not None for q in fnet.fast_params)


def test_copy_initial_weights_false_sends_meta_gradients_to_the_module(
    net: Net, x: torch.Tensor
) -> None:
    fnet = hp.monkeypatch(net, copy_initial_weights=False)
    loss = fnet(x).pow(2).sum()
    grads = torch.autograd.grad(loss, fnet.fast_params, create_graph=True)
    fnet.fast_params = [p - 0.1 * g for p, g in zip(fnet.fast_params, grads)]
    fnet(x).pow(2).sum().backward()
    init = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ref_loss = _reference(net, init, x).pow(2).sum()
    ref_grads = torch.autograd.grad(ref_loss, init, create_graph=True)
    stepped = [p - 0.1 * g for p, g in zip(init, ref_grads)]
    expected = torch.autograd.grad(_reference(net, stepped, x).pow(2).sum(), init)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_stay_frozen(net: Net) -> None:
    net.body[0].weight.requires_grad_(False)
    fnet = hp.monkeypatch(net)
    flags = [p.requires_grad for p in fnet.fast_params]
    assert flags == [p.requires_grad for p in net.parameters()]
    assert flags[0] is False


def test_device_argument_places_weights_and_buffers() -> None:
    fnet = hp.monkeypatch(nn.BatchNorm1d(3), device="meta")
    assert all(p.device.type == "meta" for p in fnet.fast_params)
    assert all(b.device.type == "meta" for b in fnet.buffers())


# ---- the user's class, attributes, hooks, copying ----------------------------------------------


def test_custom_methods_and_attributes_read_the_current_fast_weights(
    net: Net, x: torch.Tensor
) -> None:
    fnet = hp.monkeypatch(net)
    new = _shifted(fnet.fast_params, 0.5)
    fnet.fast_params = new
    assert fnet.body[0].weight is new[0]
    assert fnet.head.bias is new[5]
    expected = functional_call(
        net,
        {
            **dict(zip([n for n, _ in net.named_parameters()], new)),
            **{n: b.clone() for n, b in net.named_buffers()},
        },
        (x,),
        strict=False,
    )
    torch.testing.assert_close(fnet.head(fnet.features(x)), expected)


def test_assigning_a_submodule_weight_updates_the_fast_weights(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net)
    steps = len(fnet._higher_store.history)
    w = torch.zeros(2, 4, dtype=torch.float64)
    fnet.head.weight = w
    assert fnet.fast_params[4] is w and fnet.head.weight is w
    assert len(fnet._higher_store.history) == steps  # edits the current step, adds none
    torch.testing.assert_close(fnet(x), fnet.head.bias.expand(5, 2))
    with pytest.raises(ValueError, match=r"'head.weight'\) has shape \(4, 2\), expected \(2, 4\)"):
        fnet.head.weight = torch.zeros(4, 2, dtype=torch.float64)


def test_hooks_registered_on_the_original_fire(net: Net, x: torch.Tensor) -> None:
    calls: list[str] = []
    net.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    net.head.register_forward_hook(lambda m, a, out: calls.append("head"))

    def double(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out * 2

    net.body.register_forward_hook(double)
    fnet = hp.monkeypatch(net)
    torch.testing.assert_close(fnet(x), net(x))
    assert calls == ["pre", "head", "pre", "head"]


def test_deepcopy_gives_an_independent_functional_module(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net)
    loss = fnet(x).sum()
    grads = torch.autograd.grad(loss, fnet.fast_params, create_graph=True)
    fnet.fast_params = [p - 0.1 * g for p, g in zip(fnet.fast_params, grads)]  # non-leaf weights
    clone = copy.deepcopy(fnet)
    assert isinstance(clone, Net)
    torch.testing.assert_close(clone(x), fnet(x))
    assert len(list(clone.parameters(time=1))) == 6
    clone.fast_params = _shifted(clone.fast_params, 1.0)
    assert clone.body[0].weight is clone.fast_params[0]
    assert not torch.allclose(clone(x), fnet(x))
    assert all(p.is_leaf for p in clone.parameters(time=1))  # detached copies of the history
    assert clone.bn.running_mean is not fnet.bn.running_mean


# ---- buffers -------------------------------------------------------------------------------


def test_running_statistics_move_in_the_copy_only_until_written_back(
    net: Net, x: torch.Tensor
) -> None:
    original_mean = net.bn.running_mean.clone()
    original_tensor = net.bn.running_mean
    fnet = hp.monkeypatch(net)
    fnet(x + 3)
    assert torch.equal(net.bn.running_mean, original_mean)
    assert not torch.equal(fnet.bn.running_mean, original_mean)
    assert fnet.bn.num_batches_tracked.item() == 1
    fnet.write_back_buffers()
    assert net.bn.running_mean is original_tensor  # written in place
    assert torch.equal(net.bn.running_mean, fnet.bn.running_mean)
    assert net.bn.num_batches_tracked.item() == 1


def test_buffer_sync_copies_the_module_buffers_into_the_functional_module(
    net: Net, x: torch.Tensor
) -> None:
    fnet = hp.monkeypatch(net)
    net(x + 5)
    hp.buffer_sync(net, fnet)
    assert torch.equal(fnet.bn.running_var, net.bn.running_var)
    assert fnet.bn.running_var is not net.bn.running_var


def test_shared_submodule_keeps_one_set_of_buffers() -> None:
    bn = nn.BatchNorm1d(2)
    net = nn.Sequential(bn, nn.Linear(2, 2), bn)
    fnet = hp.monkeypatch(net)
    assert fnet[0] is fnet[2]
    fnet(torch.randn(4, 2))
    assert fnet[0].num_batches_tracked.item() == 2
    assert len(fnet.fast_params) == len(list(net.parameters())) == 4


# ---- make_functional -----------------------------------------------------------------------


def test_make_functional_is_stateless(net: Net, x: torch.Tensor) -> None:
    fnet = hp.make_functional(net)
    params = _shifted([p.detach() for p in net.parameters()], 0.2)
    torch.testing.assert_close(fnet(x, params=params), _reference(net, params, x))
    with pytest.raises(ValueError, match="no fast weights of its own"):
        fnet(x)
    with pytest.raises(ValueError, match="no fast weights of its own"):
        fnet.parameters()
    assert fnet.head.weight is None  # nothing kept between calls


def test_make_functional_encapsulator_receives_both_modules(net: Net, x: torch.Tensor) -> None:
    seen: list[tuple[nn.Module, nn.Module]] = []

    def encapsulator(fmodule: hp.FunctionalModule, module: nn.Module) -> None:
        seen.append((fmodule, module))
        fmodule.fast_params = [p.detach().clone() for p in module.parameters()]

    fnet = hp.make_functional(net, encapsulator=encapsulator)
    assert seen == [(fnet, net)]
    torch.testing.assert_close(fnet(x), _reference(net, list(net.parameters()), x))


# ---- torch.func ------------------------------------------------------------------------------


def test_vmap_over_params_uses_each_task_weights_and_keeps_no_history() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fnet = hp.monkeypatch(net)
    batched = {
        n: p.detach() + torch.randn(5, *p.shape, dtype=torch.float64)
        for n, p in fnet.named_fast_params().items()
    }
    xs = torch.randn(5, 7, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda p, x: fnet(x, params=p))(batched, xs)
    want = torch.stack(
        [functional_call(net, {n: v[i] for n, v in batched.items()}, (xs[i],)) for i in range(5)]
    )
    torch.testing.assert_close(got, want)
    assert len(fnet._higher_store.history) == 1
    assert fnet[0].weight is fnet.fast_params[0]


def test_torch_func_grad_and_functional_call_on_the_functional_module() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    fnet = hp.monkeypatch(net)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = fnet.named_fast_params()

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = functional_call(fnet, p, (x,))
        return out.pow(2).sum()

    grads = torch.func.grad(loss)(params)
    w, b = params["weight"], params["bias"]
    residual = x @ w.T + b
    torch.testing.assert_close(grads["weight"], 2 * (residual.T @ x))
    torch.testing.assert_close(grads["bias"], 2 * residual.sum(0))
    assert fnet.weight is w  # restored after the call


# ---- errors ----------------------------------------------------------------------------------


def test_bad_params_name_the_parameter(net: Net, x: torch.Tensor) -> None:
    fnet = hp.monkeypatch(net)
    good = fnet.fast_params
    with pytest.raises(ValueError, match=r"params has 3 tensors, expected 6 .*body\.0\.weight"):
        fnet(x, params=good[:3])
    bad_shape = [*good[:4], torch.zeros(3, 4, dtype=torch.float64), good[5]]
    with pytest.raises(ValueError, match=r"params\[4\] \(parameter 'head.weight'\) has shape"):
        fnet(x, params=bad_shape)
    with pytest.raises(ValueError, match=r"'body.0.bias'\) has dtype torch.float32, expected"):
        fnet(x, params=[good[0], good[1].float(), *good[2:]])
    with pytest.raises(ValueError, match=r"'head.bias'\) has device meta, expected cpu"):
        fnet(x, params=[*good[:5], good[5].to("meta")])
    with pytest.raises(ValueError, match=r"params\[1\] \(parameter 'body.0.bias'\) must be a Tens"):
        fnet(x, params=[good[0], 1.0, *good[2:]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="got a single Tensor"):
        fnet(x, params=good[0])
    with pytest.raises(ValueError, match=r"unknown parameter names \['nope'\]"):
        fnet(x, params={"nope": good[0]})
    with pytest.raises(ValueError, match=r"lacks tensors for parameters \['head.bias'\]"):
        fnet(x, params=dict(list(fnet.named_fast_params().items())[:5]))
    assert len(fnet._higher_store.history) == 1  # nothing bad entered the history


def test_bad_modules_and_arguments_are_refused(net: Net) -> None:
    with pytest.raises(ValueError, match=r"expected a torch\.nn\.Module to patch, got str"):
        hp.monkeypatch("net")
    fnet = hp.monkeypatch(net)
    with pytest.raises(hp.PatchError, match="already a functional module"):
        hp.monkeypatch(fnet)
    with pytest.raises(hp.PatchError, match="must be bools"):
        hp.monkeypatch(net, copy_initial_weights=None)
    with pytest.raises(hp.PatchError, match="time must be an int"):
        fnet.parameters(time=1.0)
    with pytest.raises(hp.PatchError, match="cannot be moved or cast in place"):
        fnet.float()


def test_errors_share_the_library_base() -> None:
    assert issubclass(hp.PatchError, hp.HigherError)
    assert issubclass(hp.PatchError, ValueError)
    assert hp.HigherError.__module__ == "higher.errors"
