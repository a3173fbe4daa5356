"""Promises of higher-errors: one base class, importable with no dependency, examples run."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import higher.errors


def test_docstring_examples_run() -> None:
    result = doctest.testmod(higher.errors, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_every_public_name_is_documented() -> None:
    for name in higher.errors.__all__:
        assert "Example" in (getattr(higher.errors, name).__doc__ or ""), name


def test_imports_without_torch_or_any_sibling() -> None:
    # A `higher` namespace holding only this distribution, with torch made unimportable.
    namespace = str(Path(higher.errors.__file__).parent.parent)
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"
        "pkg = types.ModuleType('higher')\n"
        f"pkg.__path__ = [{namespace!r}]\n"
        "sys.modules['higher'] = pkg\n"
        "import higher.errors\n"
        "print(sorted(m for m in sys.modules if m.startswith('higher')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['higher', 'higher.errors']"


def test_ships_py_typed() -> None:
    assert (Path(higher.errors.__file__).parent / "py.typed").is_file()
