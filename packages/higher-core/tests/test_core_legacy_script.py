"""A 0.2.1-era MAML script runs unchanged (warnings as errors) and meta-learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "legacy" / "maml_sine_0_2_1.py"


def test_legacy_maml_script_runs_unchanged_and_learns() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    found = re.search(r"test before (\S+) after (\S+)", out)
    assert found is not None, out
    before, after = map(float, found.groups())
    assert after < 0.9 * before  # meta-training helps on held-out tasks
