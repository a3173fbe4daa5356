"""Check the distributions `nox -s build` left in a folder before anyone installs or publishes them.

Usage: python check_dists.py DIST_FOLDER

What it proves, for the wheel and the sdist of each of the five distributions: one version for
all, the one in higher-core's `__version__`; every requirement on a sibling pinned exactly (`==`)
to that version; the licence named (Apache-2.0) and its text shipped; the README as a Markdown
long description (`twine check --strict` renders it). Exits non-zero and says what is wrong.
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("higher-errors", "higher-patch", "higher-optim", "higher-core", "higher-contrib")
VERSION_FILE = ROOT / "packages" / "higher-core" / "src" / "higher" / "__init__.py"
LICENSE = "Apache-2.0"


def source_version() -> str:
    found = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), flags=re.M)
    if found is None:
        raise SystemExit(f'no `__version__ = "..."` line in {VERSION_FILE}')
    return found.group(1)


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        names = [p.name for p in found]
        raise SystemExit(f"expected one {pattern} in {folder}, found {names or 'none'}")
    return found[0]


def wheel_files(wheel: Path) -> tuple[Message, dict[str, bytes]]:
    """The wheel's METADATA headers, and its .dist-info/licenses/ files by name."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(meta).decode())
        licenses = {
            n.rsplit("/", 1)[1]: archive.read(n)
            for n in names
            if "/licenses/" in n and n[-1] != "/"
        }
    return headers, licenses


def sdist_files(sdist: Path) -> tuple[Message, dict[str, bytes]]:
    """The sdist's PKG-INFO headers, and its top-level licence files by name."""
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        pkg_info = archive.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        headers = HeaderParser().parsestr(pkg_info.read().decode())
        licenses = {}
        for member in archive.getmembers():
            if member.name.startswith(f"{top}/LICEN") and member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                licenses[member.name.rsplit("/", 1)[1]] = extracted.read()
    return headers, licenses


def problems(dist: str, where: str, headers: Message, licenses: dict[str, bytes]) -> list[str]:
    """What is wrong with one distribution's metadata (`where`: the file it came from)."""
    version = source_version()
    found = []
    if headers["Name"] != dist:
        found.append(f"{where}: Name is {headers['Name']!r}, expected {dist!r}")
    if headers["Version"] != version:
        found.append(f"{where}: Version is {headers['Version']}, expected {version} (__version__)")
    for line in headers.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.name in PACKAGES and str(requirement.specifier) != f"=={version}":
            found.append(f"{where}: `{line}` must pin the sibling exactly: =={version}")
    if headers["License-Expression"] != LICENSE:
        found.append(f"{where}: License-Expression is {headers['License-Expression']!r}")
    license_files = headers.get_all("License-File") or []
    if "LICENSE" not in license_files or "LICENSE" not in licenses:
        found.append(f"{where}: no LICENSE file shipped (License-File: {license_files})")
    elif licenses["LICENSE"] != (ROOT / "LICENSE").read_bytes():
        found.append(f"{where}: its LICENSE differs from the repository's")
    if headers["Description-Content-Type"] != "text/markdown":
        found.append(f"{where}: the long description is not the Markdown README")
    if not headers["Requires-Python"]:
        found.append(f"{where}: no Requires-Python")
    return found


def main(folder: Path) -> None:
    found = []
    for dist in PACKAGES:
        stem = dist.replace("-", "_")
        wheel = _one(folder, f"{stem}-*.whl")
        sdist = _one(folder, f"{stem}-*.tar.gz")
        found += problems(dist, wheel.name, *wheel_files(wheel))
        found += problems(dist, sdist.name, *sdist_files(sdist))
    if found:
        raise SystemExit("the distributions are not releasable:\n  " + "\n  ".join(found))
    print(f"{len(PACKAGES)} wheels and sdists of version {source_version()}: metadata ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
