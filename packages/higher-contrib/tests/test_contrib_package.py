"""The promises of the `higher-contrib` distribution: its public names, examples and imports."""

from __future__ import annotations

import ast
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import higher.contrib

SRC = Path(higher.contrib.__file__).parent
MODULES = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
# What the package may import at import time: torch, the standard library, higher.optim.
ALLOWED_ROOTS = {"torch", "higher"}
ALLOWED_HIGHER = ("higher.errors", "higher.optim", "higher.contrib")


@pytest.mark.parametrize("name", higher.contrib.__all__)
def test_every_public_name_imports_and_is_documented_with_an_example(name: str) -> None:
    obj = getattr(higher.contrib, name)
    doc = obj.__doc__ or ""
    assert doc.strip(), name
    if name != "HigherError":  # the shared base is documented where it is defined
        assert "Example" in doc, name


def test_private_modules_are_private() -> None:
    assert all(m.startswith("_") for m in MODULES)


@pytest.mark.parametrize("module", ["__init__", *MODULES])
def test_docstring_examples_run(module: str) -> None:
    name = "higher.contrib" if module == "__init__" else f"higher.contrib.{module}"
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def _top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are allowed
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_imports_only_torch_and_higher_optim_at_import_time() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in SRC.glob("*.py"):
        for module in _top_level_imports(path):
            root = module.split(".")[0]
            assert root in stdlib | ALLOWED_ROOTS | {"__future__"}, (path.name, module)
            if root == "higher":
                assert module.startswith(ALLOWED_HIGHER), (path.name, module)


def test_import_loads_neither_higher_patch_nor_core() -> None:
    # Stand in for an install holding only higher-optim and higher-contrib: `higher` is then a
    # namespace package over their two folders and no core `__init__` runs.
    optim_src = Path(importlib.import_module("higher.optim").__file__ or "").parent
    errors_src = Path(importlib.import_module("higher.errors").__file__ or "").parent
    code = (
        "import sys, types\n"
        "ns = types.ModuleType('higher')\n"
        f"ns.__path__ = {[str(SRC.parent), str(optim_src.parent), str(errors_src.parent)]!r}\n"
        "sys.modules['higher'] = ns\n"
        "import higher.contrib\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('higher'))\n"
        "assert 'higher.patch' not in sys.modules, loaded\n"
        "assert not hasattr(ns, 'innerloop_ctx'), loaded\n"
        "print(' '.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "higher.contrib" in out.stdout.split()


def test_errors_share_the_one_higher_error_base() -> None:
    import higher.errors
    import higher.optim

    # One class, for the type checker too: it is defined once, in higher.errors.
    assert higher.contrib.HigherError is higher.optim.HigherError is higher.errors.HigherError
    for error, builtin in [
        (higher.contrib.ContribError, ValueError),
        (higher.contrib.HypergradientMismatch, AssertionError),
        (higher.contrib.ConformanceFailure, AssertionError),
    ]:
        assert issubclass(error, higher.optim.HigherError)
        assert issubclass(error, builtin)
