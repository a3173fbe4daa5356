"""The release promises that need no build: one version, exact sibling pins, the licence in every
distribution, a changelog section for the version, and README's install-from-a-checkout lines
(`nox -s build` and `nox -s isolation` check the built and installed distributions)."""

from __future__ import annotations

import importlib.util
import re
from email.message import Message
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("higher-errors", "higher-patch", "higher-optim", "higher-core", "higher-contrib")


def _module(name: str) -> ModuleType:
    path = ROOT / "tests" / "isolation" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"isolation_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_dists = _module("check_dists")
check = _module("check")
VERSION: str = check_dists.source_version()


def _pyproject(pkg: str) -> str:
    return (ROOT / "packages" / pkg / "pyproject.toml").read_text()


def _sibling_pins(pkg: str) -> dict[str, str]:
    """Each sibling requirement of the distribution (dependencies and extras): name -> specifier.
    (Read as text: tomllib is Python 3.11's, and the support starts at 3.10.)"""
    names = "|".join(PACKAGES)
    found = re.findall(rf'"((?:{names})\s*[=<>!~][^"]*)"', _pyproject(pkg))
    return {r.name: str(r.specifier) for r in map(Requirement, found)}


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_distribution_reads_the_one_version(pkg: str) -> None:
    text = _pyproject(pkg)
    assert re.search(r'^dynamic = \["version"\]$', text, flags=re.M)
    source = re.search(r'^\[tool\.hatch\.version\]\npath = "([^"]+)"$', text, flags=re.M)
    assert source is not None, f"{pkg}: no [tool.hatch.version] path"
    assert (ROOT / "packages" / pkg / source.group(1)).resolve() == check_dists.VERSION_FILE


@pytest.mark.parametrize("pkg", PACKAGES)
def test_sibling_pins_are_exact_and_equal_the_version(pkg: str) -> None:
    pins = _sibling_pins(pkg)
    if pkg == "higher-errors":
        assert pins == {}  # it depends on nothing
    else:
        assert "higher-errors" in pins and set(pins.values()) == {f"=={VERSION}"}, pins


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_distribution_ships_the_licence(pkg: str) -> None:
    assert (ROOT / "packages" / pkg / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    assert re.search(r'^license = "Apache-2.0"$', _pyproject(pkg), flags=re.M)


def test_the_changelog_has_unreleased_then_the_current_version() -> None:
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert headings[0] == "Unreleased"
    assert VERSION in headings[1:], f"CHANGELOG.md has no ## [{VERSION}] section"


def test_readme_checkout_lines_install_from_dist_and_cover_every_check() -> None:
    lines = check.readme_installs()
    assert {requirement for _, requirement in lines} == set(check.EXPECT)
    for line, _ in lines:
        assert line.startswith("pip install --find-links dist "), line


def _metadata(fields: dict[str, str | list[str]]) -> Message:
    headers = Message()
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            headers[name.replace("_", "-")] = item
    return headers


GOOD: dict[str, str | list[str]] = {
    "Name": "higher-optim",
    "Version": VERSION,
    "Requires_Dist": ["torch>=2.1", f"higher-errors=={VERSION}"],
    "License_Expression": "Apache-2.0",
    "License_File": "LICENSE",
    "Description_Content_Type": "text/markdown",
    "Requires_Python": ">=3.10",
}


def test_metadata_check_passes_good_metadata() -> None:
    licence = {"LICENSE": (ROOT / "LICENSE").read_bytes()}
    assert check_dists.problems("higher-optim", "w", _metadata(GOOD), licence) == []


@pytest.mark.parametrize(
    ("change", "licence", "says"),
    [
        ({"Version": "0.0.1"}, b"", "Version is 0.0.1"),
        ({"Requires_Dist": ["higher-errors>=0.3"]}, b"", "must pin the sibling exactly"),
        ({"License_Expression": "MIT"}, b"", "License-Expression is 'MIT'"),
        ({}, b"other text", "LICENSE differs"),
        ({"Description_Content_Type": "text/x-rst"}, b"", "not the Markdown README"),
    ],
)
def test_metadata_check_names_what_is_wrong(
    change: dict[str, str | list[str]], licence: bytes, says: str
) -> None:
    text = licence or (ROOT / "LICENSE").read_bytes()
    found = check_dists.problems(
        "higher-optim", "w", _metadata({**GOOD, **change}), {"LICENSE": text}
    )
    assert len(found) == 1 and says in found[0], found
