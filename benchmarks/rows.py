"""README table rows of a benchmark results JSON (what ``--json`` and ``gpu.sh`` write).

python benchmarks/rows.py benchmarks/results/nvidia-h200-2026-12-01.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(results: dict) -> list[str]:
    """One markdown row per benchmark: | benchmark | machine, date | result line |."""
    return [
        f"| `{name}` | {entry['machine']}, {entry['date']}, torch {entry['torch']} | {entry['line']} |"
        for name, entry in results.items()
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python benchmarks/rows.py RESULTS.json")
    path = Path(argv[0])
    if not path.is_file():
        raise SystemExit(f"rows.py: no results file at {path}")
    print("| benchmark | machine, date | measured |\n|---|---|---|")
    print("\n".join(rows(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
