"""Evaluation report: summary tables, α-sweep plot, image grids, attention maps, report.md + HTML.

Per-image rows (see :mod:`fc_pipeline.evaluation.runner`) are summarised per (checkpoint,
setting, method, α) in the paper's units: identity in % (cosine × 100), prompt consistency as
CLIP score (cosine × 100), seconds and peak memory per generated image.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fc_pipeline.storage import atomic_write

SUMMARY_KEYS = ("checkpoint", "setting", "method", "alpha")
SUMMARY_COLUMNS = SUMMARY_KEYS + (
    "images",
    "identity_pct",
    "identity_hungarian_pct",
    "prompt_consistency",
    "face_found_pct",
    "margin",
    "blended_pct",
    "seconds_per_image",
    "peak_memory_mb",
)
COMPARED_METRICS = ("identity_pct", "prompt_consistency", "margin")
PAPER_REFERENCE = [
    {"setting": "single", "method": "FastComposer (paper)", "identity_pct": 51.41, "prompt_consistency": 24.30},
    {"setting": "multi", "method": "FastComposer (paper)", "identity_pct": 43.11, "prompt_consistency": 24.25},
    {
        "setting": "multi",
        "method": "FastComposer w/o L_loc (paper)",
        "identity_pct": 37.66,
        "prompt_consistency": 25.03,
    },
]


def _mean(values: Sequence[float | None], scale: float = 1.0) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(float(np.mean(present)) * scale, 3) if present else None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (checkpoint, setting, method, α), in the paper's units."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in SUMMARY_KEYS)].append(row)
    summary = []
    for key, items in groups.items():
        margins = [r["margin"] for r in items if r["margin"] is not None]
        summary.append(
            {
                **dict(zip(SUMMARY_KEYS, key)),
                "images": len(items),
                "identity_pct": _mean([r["identity"] for r in items], 100),
                "identity_hungarian_pct": _mean([r["identity_hungarian"] for r in items], 100),
                "prompt_consistency": _mean([r["prompt_consistency"] for r in items]),
                "face_found_pct": _mean([float(r["n_faces"] > 0) for r in items], 100),
                "margin": _mean(margins),
                "blended_pct": _mean([float(m < 0) for m in margins], 100),
                "seconds_per_image": _mean([r["seconds_per_image"] for r in items]),
                "peak_memory_mb": round(max(r["peak_memory_mb"] for r in items), 1),
            }
        )
    return sorted(summary, key=lambda r: (r["checkpoint"], r["setting"], r["alpha"]))


def comparison(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoints side by side per (setting, α): each metric per checkpoint and last − first."""
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in summary))
    if len(checkpoints) < 2:
        return []
    by_key = {(r["checkpoint"], r["setting"], r["alpha"]): r for r in summary}
    rows = []
    for setting, alpha in dict.fromkeys((r["setting"], r["alpha"]) for r in summary):
        row: dict[str, Any] = {"setting": setting, "alpha": alpha}
        for metric in COMPARED_METRICS:
            values = [by_key.get((c, setting, alpha), {}).get(metric) for c in checkpoints]
            row.update({f"{metric} [{c}]": v for c, v in zip(checkpoints, values)})
            row[f"Δ {metric}"] = None if None in (values[0], values[-1]) else round(values[-1] - values[0], 3)
        rows.append(row)
    return rows


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def _header(column: str, notes: Mapping[str, str] | None) -> str:
    """The column name, marked with the note of the metric it shows (e.g. a random scorer's)."""
    note = next((text for metric, text in (notes or {}).items() if metric in column), None)
    return f"{column} ({note})" if note else column


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, notes: Mapping[str, str] | None = None
) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped); ``notes`` mark the headers of metrics."""
    if not rows:
        return "_no rows_\n"
    columns = list(columns or rows[0].keys())
    cell = lambda v: _format(v).replace("|", "\\|")  # noqa: E731
    headers = [_header(c, notes) for c in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, notes: Mapping[str, str] | None = None
) -> str:
    """An HTML table with escaped cells; ``notes`` mark the headers of metrics."""
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(_header(c, notes))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` (cells as strings), e.g. to check a report."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(
        i for i, ln in enumerate(lines) if ln.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|--")
    )
    split = lambda ln: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip("|"))]  # noqa: E731
    header = split(lines[start])
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(header, split(ln))))
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_alpha_sweep(summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Identity vs prompt consistency, one line per checkpoint and setting, points labelled by α (paper Fig. 5)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in summary:
        lines[(row["checkpoint"], row["setting"])].append(row)
    for (checkpoint, setting), items in lines.items():
        items = sorted((r for r in items if r["prompt_consistency"] is not None), key=lambda r: r["alpha"])
        xs, ys = [r["prompt_consistency"] for r in items], [r["identity_pct"] or 0.0 for r in items]
        ax.plot(xs, ys, marker="o", label=f"{checkpoint} ({setting})")
        for r, x, y in zip(items, xs, ys):
            ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("prompt consistency (CLIP score)")
    ax.set_ylabel("identity preservation (%)")
    ax.set_title("Delayed subject conditioning: α sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, Path(path))


def plot_grid(samples: Sequence[dict[str, Any]], path: str | Path, tile: int = 2) -> Path:
    """Rows of ``{"title", "references": [(name, PIL)], "generated": [(label, PIL)]}``: reference | generated."""
    plt = _pyplot()
    columns = max(len(s["references"]) + len(s["generated"]) for s in samples)
    fig, axes = plt.subplots(
        len(samples), columns, figsize=(tile * columns, (tile + 0.5) * len(samples)), squeeze=False
    )
    fig.subplots_adjust(hspace=0.5)
    for ax in axes.flat:
        ax.axis("off")
    for row, sample in zip(axes, samples):
        panels = list(sample["references"]) + list(sample["generated"])
        for ax, (label, image) in zip(row, panels):
            ax.imshow(image)
            ax.set_title(label, fontsize=7)
        row[0].text(0, -0.08, sample["title"], transform=row[0].transAxes, fontsize=7, va="top")
    return _save_figure(fig, Path(path))


def plot_attention(image, maps: np.ndarray, names: Sequence[str], title: str, path: str | Path) -> Path:
    """The generated image and each subject token's cross-attention map overlaid on it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("generated", fontsize=8)
    for ax, amap, name in zip(axes[1:], maps, names):
        ax.imshow(image)
        ax.imshow(amap, cmap="jet", alpha=0.5, extent=(0, image.width, image.height, 0), interpolation="bilinear")
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return _save_figure(fig, Path(path))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(
    out_dir: str | Path,
    summary: Sequence[dict[str, Any]],
    figures: dict[str, list[Path]],
    settings: dict[str, Any],
    notes: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """``report.md`` (figures by relative path) and a self-contained ``report.html`` (figures inlined).

    ``notes`` (metric -> text, e.g. ``{"prompt_consistency": "random scorer — not meaningful"}``) mark
    every column of that metric and head the report.
    """
    out = Path(out_dir)
    compared = comparison(summary)
    sections = [("Summary", summary, list(SUMMARY_COLUMNS), notes)]
    if compared:
        sections.append(("Checkpoint comparison", compared, None, notes))
    sections.append(("Paper reference (SD1.5, FFHQ-wild, 8×A6000)", PAPER_REFERENCE, None, None))
    warnings = [f"{metric}: {text}" for metric, text in (notes or {}).items()]
    md = [
        "# FastComposer evaluation\n",
        "Identity: FaceNet cosine of the largest generated face (single subject) or of the greedily "
        "matched faces, minimum over subjects (multi-subject); clamped at 0, no face = 0; margin = own − "
        "best other reference (negative = blended identities). Prompt consistency: CLIP image–text "
        "cosine × 100.\n",
        *(f"**{w}**\n" for w in warnings),
        markdown_table([{"setting": k, "value": v} for k, v in settings.items()]),
    ]
    body = [
        f"<h1>FastComposer evaluation</h1><p>{html.escape(md[1])}</p>",
        *(f"<p><strong>{html.escape(w)}</strong></p>" for w in warnings),
        html_table([{"setting": k, "value": v} for k, v in settings.items()]),
    ]
    for title, rows, columns, marks in sections:
        md += [f"\n## {title}\n", markdown_table(rows, columns, marks)]
        body += [f"<h2>{html.escape(title)}</h2>", html_table(rows, columns, marks)]
    for title, paths in figures.items():
        if not paths:
            continue
        md.append(f"\n## {title}\n")
        body.append(f"<h2>{html.escape(title)}</h2>")
        for p in paths:
            md.append(f"![{p.stem}]({p.relative_to(out).as_posix()})\n")
            body.append(f'<figure><img alt="{html.escape(p.stem)}" src="{_data_uri(p)}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FastComposer evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    with atomic_write(paths["markdown"], "w") as handle:
        handle.write("\n".join(md))
    with atomic_write(paths["html"], "w") as handle:
        handle.write(page)
    return paths
