"""Packaging promises of higher-patch: public names import, no sibling is loaded, py.typed."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import higher.errors
import higher.patch


def test_every_public_name_imports_and_is_documented() -> None:
    module = importlib.import_module("higher.patch")
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj.__doc__, f"higher.patch.{name} has no docstring"


def test_importing_patch_loads_no_optimizer_code() -> None:
    # A `higher` namespace holding only this distribution, as a `pip install higher-patch` has.
    namespace = str(Path(higher.patch.__file__).parent.parent)
    errors = str(Path(higher.errors.__file__).parent.parent)  # every distribution depends on it
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('higher')\n"
        f"pkg.__path__ = [{namespace!r}, {errors!r}]\n"
        "sys.modules['higher'] = pkg\n"
        "import higher.patch\n"
        "print(sorted(m for m in sys.modules if m.startswith('higher')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "higher.patch" in loaded
    assert not [m for m in loaded if m.startswith(("higher.optim", "higher.contrib"))], loaded


def test_ships_py_typed() -> None:
    assert (Path(higher.patch.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    "module",
    [
        "higher.patch",
        "higher.patch._api",
        "higher.patch._module",
        "higher.patch._compat_021",
        "higher.patch.internal",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    import torch

    import higher

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"higher": higher, "torch": torch}, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
