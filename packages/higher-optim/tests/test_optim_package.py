"""The promises of the `higher-optim` distribution: public names, examples, imports."""

from __future__ import annotations

import ast
import doctest
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import higher.errors
import higher.optim
from higher.optim import functional, internal

SRC = Path(higher.optim.__file__).parent
MODULES = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
PUBLIC_MODULES = {"functional", "internal", "rule"}  # internal: the step protocol, not user API
# the higher namespace folder of higher-errors, which every distribution depends on
ERRORS = str(Path(higher.errors.__file__).parent.parent)


def _public_names() -> list[tuple[Any, str]]:
    modules = (higher.optim, functional, higher.optim.rule, internal)
    return [(module, n) for module in modules for n in module.__all__]


def _documented_constant(name: str) -> bool:
    """A data constant (no docstring of its own) is documented by a `#:` comment above it."""
    for path in SRC.glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith((f"{name} = ", f"{name}: ")):
                return i > 0 and lines[i - 1].startswith("#:")
    return False


@pytest.mark.parametrize(
    ("module", "name"), _public_names(), ids=lambda x: getattr(x, "__name__", x)
)
def test_every_public_name_imports_and_is_documented_with_an_example(
    module: object, name: str
) -> None:
    obj = getattr(module, name)
    if isinstance(obj, frozenset) or name == "Hyper":
        assert _documented_constant(name), name
        return
    doc = obj.__doc__ or ""
    assert doc.strip(), name
    if name != "HigherError":  # the shared base is documented where it is defined
        assert "Example" in doc or name.endswith("State") or name == "RuleOptimizer", name


def test_private_modules_are_private() -> None:
    assert [m for m in MODULES if not m.startswith("_")] == sorted(PUBLIC_MODULES)


def _runnable(module: str) -> list[doctest.DocTest]:
    name = "higher.optim" if module == "__init__" else f"higher.optim.{module}"
    tests = doctest.DocTestFinder().find(importlib.import_module(name))
    if not hasattr(torch.optim, "Adafactor"):  # torch < 2.5: the example needs the torch class
        tests = [t for t in tests if "Adafactor" not in t.name]
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("module", ["__init__", *MODULES])
def test_docstring_examples_run(module: str) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = _runnable(module)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0
    if module in ("__init__", "functional", "_api", "_base", "_clip", "_twins", "_registry"):
        assert runner.tries > 0


def test_import_loads_neither_patch_nor_plugins() -> None:
    # As when higher-optim is installed alone: `higher` is a namespace holding only `optim`
    # (in the workspace venv, higher-core's `higher/__init__.py` would import everything).
    script = textwrap.dedent(
        f"""
        import sys, types
        namespace = types.ModuleType("higher")
        namespace.__path__ = [{str(SRC.parent)!r}, {ERRORS!r}]
        sys.modules["higher"] = namespace
        import higher.optim
        higher.optim.twin_of(higher.optim.DifferentiableSGD.rule and __import__("torch").optim.SGD)
        assert "higher.patch" not in sys.modules, "higher.optim imported higher.patch"
        assert not [m for m in sys.modules if m.startswith("higher_optim_testplugin")]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_torch_optimizer_is_either_a_twin_or_a_clear_error() -> None:
    twins = {
        "SGD",
        "Adam",
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "ASGD",
        "RMSprop",
        "Rprop",
        "NAdam",
        "RAdam",
        "Adafactor",
    }
    seen = set()
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
            continue
        if cls is torch.optim.Optimizer:
            continue
        seen.add(name)
        if name in twins:
            assert higher.optim.twin_of(cls).__name__ == f"Differentiable{name}"
        else:  # LBFGS, SparseAdam, and what a newer torch adds (Muon)
            with pytest.raises(higher.optim.UnsupportedOptimizerError, match=name):
                higher.optim.twin_of(cls)
    assert {"SGD", "Adam", "LBFGS", "SparseAdam"} <= seen


def test_imports_only_torch_and_the_error_base_at_import_time() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in SRC.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level: lazy imports are allowed
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for module in names:
                root = module.split(".")[0]
                assert root in stdlib | {"torch", "__future__"} or module == "higher.errors", (
                    path.name,
                    module,
                )


def test_ships_py_typed() -> None:
    assert (SRC / "py.typed").is_file()
