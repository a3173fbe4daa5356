"""Packaging promises of higher-patch: public names import, no sibling is loaded, py.typed."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import higher.patch


def test_every_public_name_imports_and_is_documented() -> None:
    module = importlib.import_module("higher.patch")
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj.__doc__, f"higher.patch.{name} has no docstring"


def test_importing_patch_loads_no_optimizer_code() -> None:
    code = (
        "import sys, higher.patch; print(sorted(m for m in sys.modules if m.startswith('higher')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "higher.patch" in loaded
    assert not [m for m in loaded if m.startswith(("higher.optim", "higher.contrib"))], loaded


def test_ships_py_typed() -> None:
    assert (Path(higher.patch.__file__).parent / "py.typed").is_file()
