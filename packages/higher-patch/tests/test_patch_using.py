"""`higher.patch.internal.using(fmodule, params)` (a block with other fast weights, outside the
history) and `keep_history` (only the current fast weights kept)."""

from __future__ import annotations

import pytest
import torch

import higher.patch
from higher.patch import internal


def _net() -> higher.patch.FunctionalModule:
    torch.manual_seed(0)
    return higher.patch.monkeypatch(
        torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    )


def test_using_runs_with_other_weights_and_records_nothing() -> None:
    fnet = _net()
    x = torch.randn(4, 2)
    before = fnet(x)
    doubled = [p * 2 for p in fnet.parameters()]
    with internal.using(fnet, doubled) as placed:
        inside = fnet(x)
        assert all(a is b for a, b in zip(fnet.fast_params, placed))
        assert all(a is b for a, b in zip(fnet.parameters(), placed))
        assert fnet.get_submodule("0").weight is placed[0]
    reference = torch.func.functional_call(fnet, dict(zip(fnet.named_fast_params(), doubled)), (x,))
    torch.testing.assert_close(inside, reference)
    torch.testing.assert_close(fnet(x), before)
    assert len(list(fnet.parameters(time=0))) == 4
    with pytest.raises(higher.patch.PatchError, match="out of range"):
        fnet.parameters(time=1)


def test_using_restores_on_error_and_checks_its_weights() -> None:
    fnet = _net()
    weights = list(fnet.parameters())
    with pytest.raises(RuntimeError, match="boom"), internal.using(fnet, [p + 1 for p in weights]):
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(fnet.fast_params, weights))
    assert fnet.get_submodule("0").weight is weights[0]
    with (
        pytest.raises(higher.patch.PatchError, match="3 tensors, expected 4"),
        internal.using(fnet, weights[:3]),
    ):
        pass


def test_keep_history_false_keeps_only_the_current_weights() -> None:
    fnet = _net()
    fnet.update_params([p * 2 for p in fnet.parameters()])
    fnet.keep_history = False  # drops what was kept
    latest = [p * 3 for p in fnet.parameters()]
    fnet.update_params(latest)
    assert all(a is b for a, b in zip(fnet.parameters(time=-1), latest))
    with pytest.raises(higher.patch.PatchError, match="keep_history=False"):
        fnet.parameters(time=0)
    with pytest.raises(higher.patch.PatchError, match="keep_history=False"):
        _ = fnet.init_fast_params
    with pytest.raises(higher.patch.PatchError, match="must be a bool"):
        fnet.keep_history = 1  # type: ignore[assignment]
    fnet.keep_history = True
    fnet.update_params([p + 1 for p in latest])
    assert len(list(fnet.parameters(time=1))) == 4  # times count from the kept weights


def test_the_seam_is_not_user_api() -> None:
    # `using`/`vacated` are for sibling packages (higher.patch.internal), not methods of the
    # module a user holds, and vacated empties the slots only for its block.
    assert not hasattr(higher.patch.FunctionalModule, "using")
    assert not hasattr(higher.patch.FunctionalModule, "vacated")
    fnet = _net()
    with internal.vacated(fnet) as weights:
        assert fnet.get_submodule("0").weight is None and len(weights) == 4
    assert fnet.get_submodule("0").weight is weights[0]
