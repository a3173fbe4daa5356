"""Every ```python block of the READMEs and of the documentation site runs, and prints what the
page shows.

Each block is a test of its own, run after the blocks before it on the same page (in one
namespace, as a reader runs them). A ```text block right after a ```python block is what that
block prints, exactly; a block that prints shows it so. A block whose first line is
`# torch >= 2.3` runs on such a torch only (`higher.compile_step` refuses an older one; its own
tests check that).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.torch_version import TorchVersion

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    *sorted(ROOT.glob("packages/*/README.md")),
    *sorted((ROOT / "docs").rglob("*.md")),
]
FENCE = re.compile(r"```python\n(.*?)```(?:\s*```text\n(.*?)```)?", flags=re.S)


@dataclass
class Block:
    code: str
    output: str | None


def blocks(page: Path) -> list[Block]:
    return [Block(code, out or None) for code, out in FENCE.findall(page.read_text())]


@dataclass
class Reader:
    """A page read so far: its namespace, and how many of its blocks ran (None after a failure)."""

    namespace: dict[str, Any]
    done: int | None = 0
    modules: list[str] = field(default_factory=list)


_readers: dict[Path, Reader] = {}


def _reader(page: Path, monkeypatch: pytest.MonkeyPatch) -> Reader:
    if page not in _readers:
        # A real module: torch.compile resolves a function's globals through sys.modules.
        module = types.ModuleType(f"__doc_{len(_readers)}__")
        sys.modules[module.__name__] = module
        _readers[page] = Reader(module.__dict__, modules=[module.__name__])
    return _readers[page]


def _runs(block: Block) -> bool:
    return not (block.code.startswith("# torch >= 2.3") and TorchVersion(torch.__version__) < "2.3")


def _run(block: Block, namespace: dict[str, Any], name: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, name, "exec"), namespace)
    return printed.getvalue()


ITEMS = [
    pytest.param(page, i, id=f"{page.relative_to(ROOT)}:{i + 1}")
    for page in PAGES
    for i in range(len(blocks(page)))
]


@pytest.mark.parametrize(("page", "index"), ITEMS)
def test_block_runs_and_prints_what_the_page_shows(
    page: Path, index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    page_blocks = blocks(page)
    reader = _reader(page, monkeypatch)
    if reader.done is None:
        pytest.fail(f"an earlier block of {page.name} failed; this one builds on it")
    try:
        for i in range(reader.done, index):  # the blocks before it, when run out of order
            if _runs(page_blocks[i]):
                _run(page_blocks[i], reader.namespace, f"{page.name} block {i + 1}")
        block = page_blocks[index]
        if not _runs(block):
            reader.done = index + 1
            return
        printed = _run(block, reader.namespace, f"{page.name} block {index + 1}")
        reader.done = index + 1
    except BaseException:
        reader.done = None
        raise
    where = f"{page.relative_to(ROOT)} block {index + 1}"
    if block.output is None:
        assert not printed, f"{where} prints; show it in a ```text block after it:\n{printed}"
    else:
        assert printed == block.output, f"{where} printed:\n{printed}"


def test_the_readme_shows_the_before_after_example() -> None:
    codes = [b.code for b in blocks(ROOT / "README.md")]
    assert any("opt.step()" in c for c in codes)
    assert any("higher.innerloop_ctx" in c for c in codes)


def test_every_page_of_the_site_is_tested_or_has_no_code() -> None:
    # the site's pages are the docs/ tree: each is in PAGES, so its code blocks run above
    assert all(p in PAGES for p in (ROOT / "docs").rglob("*.md"))
    assert sum(len(blocks(p)) for p in PAGES) == len(ITEMS) > 20
