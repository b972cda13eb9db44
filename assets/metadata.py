"""Turning library outputs into what a person wants to see in the Dagster UI.

Failure counts, markdown tables of example captions, and previews (thumbnails with segment masks
overlaid), embedded inline as base64 PNG and also saved beside the data.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from fc_pipeline.storage import atomic_write

THUMBNAIL_HEIGHT = 128
# Distinct, readable colours for segment overlays (cycled by segment id).
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (0, 128, 128),
    ],
    dtype=np.float32,
)


def failure_counts(table: pa.Table, column: str = "error") -> dict[str, int]:
    """How many rows failed, by reason code (rows whose ``column`` is not null)."""
    reasons = [r for r in table.column(column).to_pylist() if r]
    return dict(sorted(Counter(reasons).items()))


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (pipes and newlines in cells escaped)."""

    def cell(value) -> str:
        return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def highlight_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with the character spans in bold (markdown)."""
    out, last = [], 0
    for start, end in sorted(spans):
        out += [text[last:start], f"**{text[start:end]}**"]
        last = end
    out.append(text[last:])
    return "".join(out)


def caption_examples(phrases: pa.Table, limit: int = 5) -> str:
    """Markdown table of example captions: raw, expanded (noun phrases in bold), phrase count.

    Captions that were rewritten (numbered plurals) come first: they are the interesting ones.
    """
    rows = [r for r in phrases.to_pylist() if not r.get("error") and r.get("caption")]
    rows.sort(key=lambda r: r["caption"] == r["raw_caption"])
    examples = []
    for row in rows[:limit]:
        spans = [(p["start"], p["end"]) for p in json.loads(row["phrases"] or "[]")]
        examples.append(
            {
                "raw caption": row["raw_caption"],
                "expanded caption": highlight_spans(row["caption"], spans),
                "phrases": len(spans),
            }
        )
    return markdown_table(examples, ["raw caption", "expanded caption", "phrases"])


def overlay_segments(
    image: Image.Image, seg: np.ndarray, segment_ids: Iterable[int] | None = None, alpha: float = 0.5
) -> Image.Image:
    """``image`` with segments of the id map ``seg`` tinted (all non-zero ids, or ``segment_ids``)."""
    if seg.shape != (image.height, image.width):
        raise ValueError(f"segment map {seg.shape} does not match image {image.height}x{image.width}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    ids = sorted({int(i) for i in np.unique(seg) if i} if segment_ids is None else set(segment_ids))
    for segment_id in ids:
        mask = seg == segment_id
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * PALETTE[segment_id % len(PALETTE)]
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def contact_sheet(images: Sequence[Image.Image], height: int = THUMBNAIL_HEIGHT) -> Image.Image:
    """The images scaled to one height and placed side by side."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    thumbs = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    sheet = Image.new("RGB", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), height), "white")
    x = 0
    for thumb in thumbs:
        sheet.paste(thumb, (x, 0))
        x += thumb.width + 4
    return sheet


def save_preview(image: Image.Image, path: Path) -> str:
    """Save ``image`` as PNG at ``path`` (atomically) and return it as inline markdown."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return f"![preview](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"
