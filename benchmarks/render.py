"""Render benchmarks/RESULTS.md (and a speedup plot per results file) from the JSON files.

    python benchmarks/render.py                       # every benchmarks/results/*.json
    python benchmarks/render.py path/to/run.json ...  # chosen files
"""

import sys
from pathlib import Path

from mobileops.bench.report import render

HERE = Path(__file__).resolve().parent


def main(argv):
    files = [Path(a) for a in argv] or sorted((HERE / "results").glob("*.json"))
    if not files:
        print(f"no results files in {HERE / 'results'}", file=sys.stderr)
        return 2
    for path in render(files, HERE / "RESULTS.md"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
