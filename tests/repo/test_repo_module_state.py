"""No module-level mutable counters: state a call changes belongs to an object, not a module.

A module-level counter (`global n; n += 1`, `itertools.count()`) is shared by every unroll,
optimizer and thread of the process. The one module allowed a `global` is the cuDNN wrapper of
`higher.contrib`: the flag it guards, `torch.backends.cudnn.enabled`, is itself process-wide.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"packages/higher-contrib/src/higher/contrib/_cudnn.py"}


def _counters(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [f"line {n.lineno}: global {', '.join(n.names)}" for n in ast.walk(tree)
             if isinstance(n, ast.Global)]  # fmt: skip
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            func = ast.unparse(node.value.func)
            if func in ("itertools.count", "count"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_level_counters() -> None:
    found = {}
    for path in sorted(ROOT.glob("packages/*/src/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in ALLOWED and (hits := _counters(path)):
            found[rel] = hits
    assert found == {}


def test_the_check_sees_a_counter(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import itertools\n_IDS = itertools.count()\n_n = 0\ndef f():\n"
                      "    global _n\n    _n += 1\n")  # fmt: skip
    assert _counters(module) == ["line 5: global _n", "line 2: _IDS = itertools.count()"]
