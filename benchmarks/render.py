"""Render benchmarks/RESULTS.md (and a speedup plot per results file) from the JSON files.

    python benchmarks/render.py                       # every benchmarks/results/*.json
    python benchmarks/render.py path/to/run.json ...  # chosen files

The tables of ``benchmarks/static_report.py`` runs (``benchmarks/results/static/*.md``, newest
first) follow the measured runs: what the kernels compile to, without a GPU.
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
    append_static_reports(HERE / "RESULTS.md", sorted((HERE / "results" / "static").glob("*.md"), reverse=True))
    return 0


def append_static_reports(markdown: Path, tables: list[Path]) -> None:
    """Add a section per static report table to the rendered results."""
    if not tables:
        return
    lines = ["", "## Static reports (compiled for sm_90 on a CPU; nothing timed)", "",
             "Written by `python benchmarks/static_report.py --out benchmarks/results/static/NAME.json`; "
             "columns in benchmarks/README.md.", ""]
    for table in tables:
        lines += [f"### `{table.name}`", "", table.read_text().strip(), ""]
    markdown.write_text(markdown.read_text().rstrip("\n") + "\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
