"""Run inside a fresh venv holding one requirement installed from the built wheels; prove what
it holds.

Usage: python check.py REQUIREMENT   (one of README's install-from-a-checkout lines installs it:
higher-core[all], higher-core, higher-patch, higher-optim or higher-contrib)
       python check.py --readme      (prints those README lines, one a line, as written)
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# README.md's "Install from a checkout" commands: the ```bash block right after this marker.
MARKER = "<!-- checkout-install: each line runs in a fresh venv in `nox -s isolation` -->"

# higher-errors (the one HigherError) comes with every distribution.
EXPECT = {
    "higher-patch": {"higher-errors", "higher-patch"},
    "higher-optim": {"higher-errors", "higher-optim"},
    "higher-contrib": {"higher-errors", "higher-optim", "higher-contrib"},
    "higher-core": {"higher-errors", "higher-patch", "higher-optim", "higher-core"},
    "higher-core[all]": {
        "higher-errors",
        "higher-patch",
        "higher-optim",
        "higher-core",
        "higher-contrib",
    },
}
MODULE_OF = {
    "higher-errors": "higher.errors",
    "higher-patch": "higher.patch",
    "higher-optim": "higher.optim",
    "higher-core": "higher.utils",
    "higher-contrib": "higher.contrib",
}


def readme_installs() -> list[tuple[str, str]]:
    """README's install-from-a-checkout lines, each with the requirement it installs."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(re.escape(MARKER) + r"\n```bash\n(.*?)```", readme, flags=re.S)
    if found is None:
        raise SystemExit(f"README.md has no ```bash block right after {MARKER}")
    lines = [line for line in found.group(1).splitlines() if line.strip()]
    return [(line, shlex.split(line, comments=True)[-1]) for line in lines]


def importable(module: str) -> bool:
    code = f"import {module}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def main(combo: str) -> None:
    if combo not in EXPECT:
        raise SystemExit(f"no check for installing {combo!r}; known: {', '.join(EXPECT)}")
    wanted = EXPECT[combo]
    installed = {d for d in MODULE_OF if _installed(d)}
    assert installed == wanted, f"{combo}: installed {sorted(installed)}, expected {sorted(wanted)}"
    for dist, module in MODULE_OF.items():
        ok = importable(module)
        assert ok == (dist in wanted), f"{combo}: import {module} -> {ok}, expected {not ok}"
    # Every distribution ships only its own files.
    for dist in wanted:
        files = [
            str(f)
            for f in md.files(dist) or []
            if str(f).startswith("higher/") and "__pycache__" not in str(f)
        ]
        own = "higher/" if dist == "higher-core" else MODULE_OF[dist].replace(".", "/") + "/"
        foreign = [f for f in files if not f.startswith(own)]
        if dist == "higher-core":  # core owns higher/ but for its siblings' folders
            siblings = {MODULE_OF[d].replace(".", "/") + "/" for d in MODULE_OF if d != dist}
            foreign = [f for f in files if any(f.startswith(s) for s in siblings)]
        assert not foreign, f"{dist} ships files outside {own}: {foreign}"
        assert any(f.endswith("py.typed") for f in files), f"{dist} ships no py.typed"
    # Each package works, and loads nothing it must not (with higher-core installed, importing
    # any submodule runs higher/__init__.py, which imports both halves by design).
    alone = "higher-core" not in wanted
    if "higher-patch" in wanted and alone:
        _run(
            "import sys, torch, higher.patch as hp\n"
            "f = hp.monkeypatch(torch.nn.Linear(2, 1))\n"
            "assert f(torch.ones(1, 2)).shape == (1, 1)\n"
            "assert 'higher.optim' not in sys.modules, 'higher.patch loaded higher.optim'\n"
            "assert issubclass(hp.PatchError, __import__('higher.errors').errors.HigherError)\n"
        )
    if "higher-optim" in wanted and alone:
        _run(
            "import sys, higher.optim\n"
            "assert 'higher.patch' not in sys.modules, 'higher.optim loaded higher.patch'\n"
        )
    if "higher-core" in wanted:
        _check_core_uses_only_public_names()
        _run(
            "import sys, torch, higher\n"
            "m = torch.nn.Linear(2, 1)\n"
            "with higher.innerloop_ctx(m, torch.optim.SGD(m.parameters(), lr=0.1)) as (f, o):\n"
            "    o.step(f(torch.ones(1, 2)).sum())\n"
            "assert ('higher.contrib' in sys.modules) is False\n"
        )
    print(f"{combo}: ok ({', '.join(sorted(wanted))})")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def private_names(folders: list[Path]) -> set[str]:
    """The private names the code under `folders` defines: functions, classes, module and class
    attributes, and attributes it assigns on its objects (`self._x = ...`)."""
    names: set[str] = set()
    for path in (f for folder in folders for f in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            else:
                continue
            if _is_private(name):
                names.add(name)
    return names


def private_uses(folder: Path, others: dict[str, Path]) -> list[str]:
    """Where the code in `folder` uses a private name of another package (`others`: module name
    -> its folder): imports of its private modules or names, and private attributes it defines
    read on any object but the code's own `self`/`cls`."""
    foreign = private_names(list(others.values()))
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module:
                for module in others:
                    if node.module.startswith(module + "._") or (
                        node.module == module and any(_is_private(a.name) for a in node.names)
                    ):
                        found.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr in foreign:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{where} uses .{node.attr}")
    return found


def _check_core_uses_only_public_names() -> None:
    import higher
    import higher.optim
    import higher.patch

    core = Path(higher.__file__).parent  # the installed wheel's files
    others = {m.__name__: Path(m.__file__ or "").parent for m in (higher.optim, higher.patch)}
    used = private_uses(core, others)
    assert not used, f"higher-core uses private names of its siblings: {used}"


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    if sys.argv[1] == "--readme":
        print("\n".join(line for line, _ in readme_installs()))
    else:
        importlib.invalidate_caches()
        main(sys.argv[1])
