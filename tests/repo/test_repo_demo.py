"""The demo, examples/maml_digits.py, runs end to end at its smoke size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "maml_digits.py"
ACCURACY = re.compile(r"^\s+(MAML|baseline)\b.*?([\d.]+) % ± ([\d.]+)$", re.MULTILINE)


@pytest.mark.slow
def test_demo_smoke_prints_both_accuracies_and_saves_the_curve(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = {
        name: (float(mean) / 100, float(half) / 100)
        for name, mean, half in ACCURACY.findall(done.stdout)
    }
    assert set(found) == {"MAML", "baseline"}, done.stdout
    for mean, half_width in found.values():
        assert 0 <= mean <= 1
        assert 0 <= half_width <= 1
    assert str(out) in done.stdout
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
