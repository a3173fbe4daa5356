"""Packaging promises of higher-core: names import and are documented; the namespace is shared."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import higher


@pytest.mark.parametrize(
    "module", ["higher", "higher.utils", "higher.distributed", "higher.estimators"]
)
def test_every_public_name_imports_and_is_documented(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not isinstance(obj, str):
            assert obj.__doc__, f"{module}.{name} has no docstring"


@pytest.mark.parametrize(
    "module",
    [
        "higher",
        "higher._fast.compiled",
        "higher._context",  # higher._errors' examples run with the public modules of its
        # classes (their __module__): higher, higher.distributed, higher.implicit
        "higher._unroll.modes",
        "higher.utils",
        "higher.distributed",
        "higher.distributed._shard",
        "higher._fast.tasks",
        "higher._fast.metastep",
        "higher.estimators",
        "higher.estimators._particles",
        "higher.estimators._estimators",
        "higher.estimators._problem",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    import torch
    from torch.torch_version import TorchVersion

    if (
        module == "higher._fast.compiled" and TorchVersion(torch.__version__) < "2.3"
    ):  # its examples compile
        with pytest.raises(higher.UsageError, match="needs torch"):
            higher.compile_step(lambda m: m(torch.ones(1)).sum())
        return

    result = doctest.testmod(mod, extraglobs={"higher": higher, "torch": torch}, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_namespace_spans_the_four_distributions() -> None:
    code = (
        "import higher, higher.patch, higher.optim, higher.contrib; "
        "print(higher.patch.__file__, higher.optim.__file__, higher.contrib.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    files = out.stdout.split()
    assert [f.split("/src/")[0].rsplit("/", 1)[-1] for f in files] == [
        "higher-patch",
        "higher-optim",
        "higher-contrib",
    ] or all("site-packages" in f for f in files)


def test_importing_higher_loads_no_contrib() -> None:
    code = "import sys, higher; print('higher.contrib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_core_uses_no_private_name_of_patch_or_optim() -> None:
    # The same scan the isolation session runs on the installed wheel, here on the sources.
    import importlib.util

    import higher.optim
    import higher.patch

    check = Path(__file__).resolve().parents[3] / "tests" / "isolation" / "check.py"
    spec = importlib.util.spec_from_file_location("isolation_check", check)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    others = {m.__name__: Path(m.__file__ or "").parent for m in (higher.optim, higher.patch)}
    assert "_make_plan" in module.private_names(list(others.values()))  # the scan sees them
    assert module.private_uses(Path(higher.__file__).parent, others) == []
