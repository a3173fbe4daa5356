"""Every ```python block of the READMEs runs, in order, one namespace per README."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from higher._compiled import torch_version

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_code_blocks_run(
    readme: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = _blocks(readme)
    # A real module: torch.compile resolves a function's globals through sys.modules.
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for i, block in enumerate(blocks):
        if block.startswith("# torch >= 2.3") and torch_version() < (2, 3):
            continue  # higher.compile_step refuses such a torch (its own tests check that)
        code = compile(block, f"{readme.name} block {i + 1}", "exec")
        exec(code, namespace)


def test_the_main_readme_shows_the_before_after_example() -> None:
    blocks = _blocks(ROOT / "README.md")
    assert any("opt.step()" in b for b in blocks)
    assert any("higher.innerloop_ctx" in b for b in blocks)
