"""The built documentation site shows the public API, and only it.

Run after the site is built (`nox -s docs` builds it into site/, then runs these tests; or
`mkdocs build --strict --site-dir site`, then `pytest --noconftest tests/docs`). Every name of
every public module's `__all__` must have an anchor `module.name` on the site, and no anchor,
heading or base class may name a private member. The `__all__` lists are read from the sources
(with `ast`), so neither torch nor the packages need to be installed.
"""

from __future__ import annotations

import ast
import os
import re
from functools import cache
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("HIGHER_SITE_DIR", ROOT / "site"))
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# A dotted path through a private name: higher._errors.UnrollError, higher.utils._copy_tensor.
PRIVATE_PATH = re.compile(r"\bhigher(?:\.\w+)*?\.(_\w+)")
IDENTIFIER = re.compile(r"(?<![\w.])_\w+")


def _exports(path: Path) -> list[str] | None:
    """The names a module's `__all__` lists (a literal list or tuple of strings), or None."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                assert node.value is not None, path
                value = ast.literal_eval(node.value)
                assert all(isinstance(name, str) for name in value), path
                return list(value)
    return None


@cache
def public_modules() -> dict[str, list[str] | None]:
    """Each public module of the `higher` namespace (no `_` name in its path, not an
    `internal` module), with its `__all__`, across the five distributions' sources."""
    found: dict[str, list[str] | None] = {}
    for src in sorted(ROOT.glob("packages/*/src")):
        for path in sorted((src / "higher").rglob("*.py")):
            parts = path.relative_to(src).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            # `internal` modules are the seam between the distributions, documented in their
            # docstrings for plugin authors and kept out of the API reference
            if not any(part.startswith("_") for part in parts) and parts[-1] != "internal":
                found[".".join(parts)] = _exports(path)
    return found


class _Page(HTMLParser):
    """The anchors of one page, and the text of its headings, base-class lists and prose."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.link_titles: list[str] = []
        self.headings: list[str] = []
        self.bases: list[str] = []
        self.text: list[str] = []  # visible text outside code blocks (examples may use `_`)
        self._open: list[tuple[str, str]] = []  # (tag, role) of the elements around the text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "a" and found.get("title"):
            self.link_titles.append(str(found["title"]))
        role = ""
        if tag in HEADINGS:
            role = "heading"
        elif "doc-class-bases" in (found.get("class") or "").split():
            role = "bases"
        elif tag == "pre":
            role = "code"
        if tag not in {"br", "img", "input", "meta", "link", "hr", "wbr", "source"}:
            self._open.append((tag, role))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        roles = {role for _, role in self._open}
        if "heading" in roles:
            self.headings.append(data)
        if "bases" in roles:
            self.bases.append(data)
        if "code" not in roles:
            self.text.append(data)


@cache
def pages() -> dict[str, _Page]:
    found: dict[str, _Page] = {}
    for path in sorted(SITE.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        found[path.relative_to(SITE).as_posix()] = page
    return found


@cache
def anchors() -> frozenset[str]:
    return frozenset(anchor for page in pages().values() for anchor in page.ids)


def _exported(name: str) -> bool:
    """Whether a `_`-prefixed name is public anyway: a dunder that a public `__all__` lists."""
    return any(name in (names or ()) for names in public_modules().values())


def test_the_site_is_built() -> None:
    assert (SITE / "reference").is_dir(), f"no built site at {SITE}: run `nox -s docs` first"


def test_every_public_module_declares_its_names() -> None:
    modules = public_modules()
    assert {"higher", "higher.patch", "higher.optim", "higher.errors"} <= set(modules)
    assert [name for name, names in modules.items() if names is None] == []


@pytest.mark.parametrize("module", sorted(public_modules()))
def test_every_exported_name_has_an_anchor(module: str) -> None:
    expected = [module, *(f"{module}.{name}" for name in public_modules()[module] or [])]
    assert [anchor for anchor in expected if anchor not in anchors()] == []


def test_no_anchor_names_a_private_member() -> None:
    private = sorted(
        anchor
        for anchor in anchors()
        if anchor.startswith("higher")
        for part in anchor.split(".")
        if part.startswith("_") and not _exported(part)
    )
    assert private == []


@pytest.mark.parametrize("what", ["headings", "bases"])
def test_no_heading_or_base_class_names_a_private_member(what: str) -> None:
    found = {
        f"{url}: {token}"
        for url, page in pages().items()
        for text in getattr(page, what)
        for token in IDENTIFIER.findall(text)
        if not _exported(token)
    }
    assert sorted(found) == []


def test_the_reference_names_no_private_path() -> None:
    found = {
        f"{url}: {match.group(0)}"
        for url, page in pages().items()
        if url.startswith("reference/")
        for text in [*page.text, *page.link_titles]
        for match in PRIVATE_PATH.finditer(text)
        if not _exported(match.group(1))
    }
    assert sorted(found) == []


def test_the_reference_shows_no_step_protocol() -> None:
    """The step protocol is internal (`higher.optim.internal`): not on the user's API pages."""
    seam = {
        "higher.optim.StepPlan",
        "higher.optim.StepResult",
        "higher.optim.Bucket",
        "higher.optim.DifferentiableOptimizer.plan",
        "higher.optim.DifferentiableOptimizer.commit",
    }
    assert sorted(seam & anchors()) == []
