"""Plugins of the entry-point group `higher.optimizers`: the installed test plugin
(`plugin_dist/`, installed into the test venv) and throwaway distributions on a temporary path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import higher.optim


@pytest.fixture(autouse=True)
def _fresh_plugin_cache() -> Iterator[None]:
    higher.optim.clear_plugin_cache()
    yield
    higher.optim.clear_plugin_cache()


def test_plugins_are_lazy_resolved_by_name_and_isolated() -> None:
    script = textwrap.dedent(
        """
        import sys, torch, higher.optim
        assert "higher_optim_testplugin" not in sys.modules, "import loaded a plugin"
        w = torch.nn.Parameter(torch.ones(2))
        higher.optim.get_diff_optim(torch.optim.Adam([w]), [w])
        assert not any(m.startswith("higher_optim_testplugin.") for m in sys.modules)
        from higher_optim_testplugin.optimizers import Broken, Lion
        try:
            higher.optim.get_diff_optim(Broken([w], lr=0.1), [w])
        except higher.optim.PluginError as err:
            message = str(err)
        else:
            raise AssertionError("a broken plugin resolved")
        assert "higher_optim_testplugin.optimizers.Broken" in message, message
        assert "higher-optim-testplugin" in message, message
        assert "ModuleNotFoundError" in message, message
        twin = higher.optim.get_diff_optim(Lion([w], lr=0.1), [w])
        assert type(twin).__name__ == "DifferentiableLion"
        assert "higher_optim_testplugin.broken" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_installed_plugin_twin_equals_its_torch_optimizer() -> None:
    from higher_optim_testplugin.optimizers import Lion

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    start = w.detach().clone().requires_grad_()
    opt = Lion([w], lr=0.01, weight_decay=0.1)
    diffopt = higher.optim.get_diff_optim(opt, [w])
    assert type(diffopt).__name__ == "DifferentiableLion"
    assert higher.optim.twin_of(Lion) is type(diffopt)
    params = [start]
    for k in range(10):
        opt.zero_grad()
        torch.autograd.backward(((w - k) ** 2).sum())
        opt.step()
        params = diffopt.step(((params[0] - k) ** 2).sum(), params=params)
        torch.testing.assert_close(params[0], w.detach(), rtol=1e-10, atol=1e-12)


def _write_dist(root: Path, dist: str, entry_points: dict[str, str], module: str) -> None:
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[higher.optimizers]\n{lines}\n")
    (root / f"{dist.replace('-', '_')}.py").write_text(textwrap.dedent(module))


TWIN_MODULE = """
    from higher.optim import DifferentiableSGD as Twin
    NotATwin = object
"""


def test_two_plugins_claiming_one_optimizer_is_an_error_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contested = type("Contested", (torch.optim.SGD,), {"__module__": "rivals.optimizers"})
    name = "rivals.optimizers.Contested"
    _write_dist(tmp_path, "rival-a", {name: "rival_a:Twin"}, TWIN_MODULE)
    _write_dist(tmp_path, "rival-b", {name: "rival_b:Twin"}, TWIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    higher.optim.clear_plugin_cache()
    with pytest.raises(higher.optim.PluginError, match=r"rival-a.*rival-b|rival-b.*rival-a"):
        higher.optim.twin_of(contested)
    # the conflict breaks no other plugin
    from higher_optim_testplugin.optimizers import Lion

    assert higher.optim.twin_of(Lion).__name__ == "DifferentiableLion"


def test_a_plugin_cannot_silently_replace_a_builtin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_dist(tmp_path, "usurper", {"torch.optim.adam.Adam": "usurper:Twin"}, TWIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    higher.optim.clear_plugin_cache()
    with pytest.warns(higher.optim.PluginWarning, match=r"usurper.*built-in"):
        twin = higher.optim.twin_of(torch.optim.Adam)
    assert twin is higher.optim.DifferentiableAdam
    assert "usurper" not in sys.modules


def test_a_plugin_that_is_no_twin_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = type("Odd", (torch.optim.SGD,), {"__module__": "oddities"})
    _write_dist(tmp_path, "odd-plugin", {"oddities.Odd": "odd_plugin:NotATwin"}, TWIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    higher.optim.clear_plugin_cache()
    with pytest.raises(higher.optim.PluginError, match=r"odd-plugin.*not a higher\.optim"):
        higher.optim.twin_of(odd)


def test_register_optim_wins_over_a_plugin() -> None:
    from higher_optim_testplugin.optimizers import Broken

    class DifferentiableFixed(higher.optim.DifferentiableSGD):
        pass

    higher.optim.register_optim(Broken, DifferentiableFixed)
    assert higher.optim.twin_of(Broken) is DifferentiableFixed


NEAR_MISS_MODULE = """
    import torch
    from higher.optim import DifferentiableSGD as Twin

    class Nearby(torch.optim.SGD):
        pass

    Nearby.__module__ = "near_plugin._impl"  # its qualified name: near_plugin._impl.Nearby
"""


def test_an_entry_point_named_by_another_path_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the plugin author named the class by the path users import it from, not its own
    _write_dist(
        tmp_path, "near-plugin", {"near_plugin.Nearby": "near_plugin:Twin"}, NEAR_MISS_MODULE
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    higher.optim.clear_plugin_cache()
    import near_plugin  # type: ignore[import-not-found]

    with pytest.warns(
        higher.optim.PluginWarning,
        match=r"'near_plugin\.Nearby'.*near-plugin.*rename the entry point to "
        r"'near_plugin\._impl\.Nearby'",
    ):
        twin = higher.optim.twin_of(near_plugin.Nearby)
    assert twin is higher.optim.DifferentiableSGD  # what the subclass resolves to meanwhile
