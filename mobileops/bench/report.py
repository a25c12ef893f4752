"""Render results files into ``benchmarks/RESULTS.md`` and one speedup plot (SVG) per run.

Everything in the page is computed from the JSON rows; nothing is typed in by hand. Ratios
are ``baseline time / mobileops time`` (above 1: mobileops is faster).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from html import escape
from pathlib import Path

from mobileops.bench.run import BASELINES

#: The ratio targets RESULTS.md checks (H100): group pattern -> (baseline, minimum ratio) pairs.
#: docs/measuring.md ("Targets") sets them beside the project's goals, which they do not all match.
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "op:dwconv_bn_act:inference": (("eager", 2.0), ("compile", 1.5)),
    "op:dwconv_bn_act:train_forward": (("eager", 2.0), ("compile", 1.4)),
    "op:dwconv_bn_act:backward": (("eager", 2.5), ("compile", 1.6)),
    "op:squeeze_excite:forward": (("eager", 2.0), ("compile", 1.3)),
    "op:squeeze_excite:forward_backward": (("eager", 2.0), ("compile", 1.3)),
    "detector:*:train_step": (("eager", 2.0), ("compile", 1.3), ("eager_graph", 1.15)),
    "detector:*:inference": (("eager_folded", 1.3), ("compile", 1.15)),
}

_KIND_ORDER = ("op", "block", "detector")
_SHORT = {"eager": "eager", "eager_folded": "folded", "eager_graph": "eager+graph", "compile": "compile"}


def _matches(pattern: str, group: str) -> bool:
    want, have = pattern.split(":"), group.split(":")
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have))


def _impls(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for name in list(row["times_ms"]) + list(row["errors"]):
            if name not in seen:
                seen.append(name)
    baselines = [b for b in BASELINES if b in seen]
    return baselines + sorted(n for n in seen if n not in baselines)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def group_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines of one group: a row per case, times and ratios per implementation."""
    impls = _impls(rows)
    fused = [n for n in impls if n.startswith("mobileops")]
    # "compile" of a train step is its fastest compile mode (the row's best_compile)
    baselines = [b for b in BASELINES if b in impls or any(k.endswith(f"_speedup_vs_{b}") for r in rows for k in r)]
    header = ["case"] + [f"{n} ms" for n in impls]
    for name in fused:
        short = name.replace("mobileops_", "")
        header += [f"{short} vs {_SHORT[b]}" for b in baselines]
        if any(r.get("min_bytes") for r in rows):
            header.append(f"{short} % of copy")
        if any(r.get("peak_memory_bytes") for r in rows):
            header.append(f"{short} peak MiB (eager)")
    throughput = any(r.get("mode") == "train_step" and r.get("images_per_s") for r in rows)
    if throughput:
        header += [f"{n} img/s" for n in impls]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        cells = [row["name"]] + [_fmt(row["times_ms"].get(n)) for n in impls]
        for name in fused:
            cells += [f"{row[k]:.2f}x" if (k := f"{name}_speedup_vs_{b}") in row else "-" for b in baselines]
            if any(r.get("min_bytes") for r in rows):
                fraction = row.get(f"{name}_fraction_of_copy")
                cells.append(f"{100 * fraction:.0f}%" if fraction is not None else "-")
            if any(r.get("peak_memory_bytes") for r in rows):
                peak = row.get("peak_memory_bytes") or {}
                cells.append(f"{peak[name] / 2 ** 20:.0f} ({peak['eager'] / 2 ** 20:.0f})"
                             if name in peak and "eager" in peak else "-")
        if throughput:
            cells += [f"{row.get('images_per_s', {})[n]:.0f}" if n in row.get("images_per_s", {}) else "-"
                      for n in impls]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row['name']}, {name}: {escape(msg)}" for name, msg in row["errors"].items()]
    if notes:
        lines += ["", "Not timed:", *notes]
    return lines


def target_summary(rows: Sequence[dict]) -> list[str]:
    """Markdown lines comparing the median ratio of each targeted group with its target in :data:`TARGETS`."""
    lines = ["| group | implementation | baseline | median ratio (min, max; cases) | target | met |",
             "|---|---|---|---|---|---|"]
    count = 0
    for pattern, targets in TARGETS.items():
        matching = [r for r in rows if _matches(pattern, r["group"])]
        for name in _impls(matching):
            if not name.startswith("mobileops"):
                continue
            for base, goal in targets:
                ratios = [r[k] for r in matching if (k := f"{name}_speedup_vs_{base}") in r]
                if not ratios:
                    continue
                median = statistics.median(ratios)
                lines.append(f"| {pattern} | {name} | {base} | {median:.2f}x ({min(ratios):.2f}, {max(ratios):.2f};"
                             f" {len(ratios)}) | >= {goal}x | {'yes' if median >= goal else 'no'} |")
                count += 1
    return lines if count else []


def speedup_svg(rows: Sequence[dict], title: str, baseline: str = "eager") -> str:
    """A horizontal bar chart: one bar per (case, mobileops implementation), the ratio to
    ``baseline``, with a line at 1x. Rows without that ratio are left out."""
    bars = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("mobileops_") and key.endswith(f"_speedup_vs_{baseline}"):
                impl = key[len("mobileops_"):-len(f"_speedup_vs_{baseline}")]
                bars.append((f"{row['group'].split(':', 1)[1]} {row['name']} [{impl}]", float(value)))
    label_w, bar_w, bar_h, top = 560, 360, 16, 40
    height = top + bar_h * max(1, len(bars)) + 30
    peak = max([2.0] + [v for _, v in bars])
    scale = bar_w / peak
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 70}" height="{height}" '
             f'font-family="monospace" font-size="10">',
             f'<text x="4" y="16" font-size="13">{escape(title)}</text>',
             f'<text x="4" y="32">ratio to {escape(baseline)} (time {escape(baseline)} / time mobileops)</text>']
    for i, (label, value) in enumerate(bars):
        y = top + i * bar_h
        colour = "#2a7" if value >= 1 else "#c44"
        parts.append(f'<text x="{label_w - 4}" y="{y + 11}" text-anchor="end">{escape(label[:90])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{max(1.0, value * scale):.1f}" height="{bar_h - 4}" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{label_w + value * scale + 4:.1f}" y="{y + 11}">{value:.2f}x</text>')
    one = label_w + scale
    parts.append(f'<line x1="{one:.1f}" y1="{top}" x2="{one:.1f}" y2="{height - 24}" stroke="#000" '
                 f'stroke-dasharray="3,2"/>')
    parts.append(f'<text x="{one:.1f}" y="{height - 10}" text-anchor="middle">1x</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render(result_files: Sequence[Path], markdown_path: Path) -> list[Path]:
    """Write ``markdown_path`` (all runs, newest first) and ``<result>.svg`` beside each
    results file; returns the files written."""
    documents = []
    for path in result_files:
        path = Path(path)
        documents.append((path, json.loads(path.read_text())))
    documents.sort(key=lambda item: item[1]["environment"]["date"], reverse=True)
    markdown_path = Path(markdown_path)
    lines = ["# Benchmark results", "",
             "Rendered by `python benchmarks/render.py` from the JSON files in `benchmarks/results/`; "
             "do not edit by hand. Times are medians in milliseconds; ratios are baseline time / mobileops "
             "time (above 1x mobileops is faster); `% of copy` is the op's minimum bytes moved per second "
             "as a fraction of a device copy measured in the same run. Baselines: `eager` (plain PyTorch "
             "modules, cudnn.benchmark on), `eager_folded` (BatchNorm folded), `compile` (torch.compile "
             "of eager). An implementation whose output disagrees with eager is not timed.", ""]
    if not any(doc["environment"].get("device_type") == "cuda" for _, doc in documents):
        lines += ["**No GPU run yet.** Every figure below is from a CPU, where mobileops can only run its "
                  "`torch` backend (the same plain composition as eager, behind the op layer); the Triton "
                  "and CUDA kernels have not been timed, and no target has been checked.", ""]
    written = []
    for path, doc in documents:
        env, rows = doc["environment"], doc["rows"]
        svg_path = path.with_suffix(".svg")
        svg_path.write_text(speedup_svg(rows, f"{env['device']} {env['date'][:10]}"))
        written.append(svg_path)
        rel_svg = Path("results") / svg_path.name if svg_path.parent.name == "results" else svg_path
        lines += [f"## {env['device']}, {env['date'][:10]} (`{path.name}`)", "",
                  f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
                  f"python {env['python']}, mobileops {env['mobileops']}, {env.get('cpu_threads')} CPU threads; "
                  f"copy bandwidth {doc['copy_bytes_per_s'] / 1e9:.1f} GB/s; torch.compile mode "
                  f"{doc.get('compile_mode') or 'not run'}.", ""]
        summary = target_summary(rows)
        if summary and env.get("device_type") == "cuda":
            lines += ["### Targets", "", "Median ratio per group against `mobileops.bench.report.TARGETS` "
                      "(docs/measuring.md, \"Targets\").", "", *summary, ""]
        lines += [f"![speedup per case]({rel_svg.as_posix()})", ""]
        groups: dict[str, list[dict]] = {}
        for row in sorted(rows, key=lambda r: _KIND_ORDER.index(r["kind"])):
            groups.setdefault(row["group"], []).append(row)
        for group, members in groups.items():
            lines += [f"### {group}", "", *group_table(members), ""]
    markdown_path.write_text("\n".join(lines).rstrip() + "\n")
    written.append(markdown_path)
    return written
