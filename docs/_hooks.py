"""mkdocs hooks: the benchmark results (written by the benchmarks into benchmarks/results/) are
served from the site as they are, without a copy in docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(RESULTS.rglob("*.png")):  # threads-2/ too
        files.append(
            File(
                f"benchmarks/results/{path.relative_to(RESULTS).as_posix()}",
                src_dir=str(RESULTS.parents[1]),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
