"""What the assets put into the UI: tables, highlighted phrases, overlays, previews."""

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from assets.metadata import (
    caption_examples,
    contact_sheet,
    failure_counts,
    highlight_spans,
    markdown_table,
    overlay_segments,
    save_preview,
)


def test_markdown_table_escapes_cells():
    table = markdown_table([{"a": "x|y", "b": "line\nbreak"}, {"a": None}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | line break |", "|  |  |"]


def test_caption_examples_put_rewritten_captions_first_with_phrases_in_bold():
    rows = [
        {
            "raw_caption": "a dog",
            "caption": "a dog",
            "phrases": json.dumps([{"text": "a dog", "start": 0, "end": 5}]),
            "error": None,
        },
        {
            "raw_caption": "two women",
            "caption": "a woman and a woman",
            "phrases": json.dumps(
                [{"text": "a woman", "start": 0, "end": 7}, {"text": "a woman", "start": 12, "end": 19}]
            ),
            "error": None,
        },
        {"raw_caption": None, "caption": None, "phrases": None, "error": "truncated"},
    ]
    lines = caption_examples(pa.Table.from_pylist(rows)).splitlines()
    assert lines[2] == "| two women | **a woman** and **a woman** | 2 |"
    assert lines[3] == "| a dog | **a dog** | 1 |"
    assert len(lines) == 4
    assert highlight_spans("abc", []) == "abc"


def test_overlay_tints_only_the_chosen_segments():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    seg = np.array([[0, 1, 1, 2], [0, 1, 2, 2]], np.uint16)
    out = np.asarray(overlay_segments(image, seg, [2]))
    assert out[0, 0].tolist() == out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 3].sum() > 0
    assert np.asarray(overlay_segments(image, seg))[0, 1].sum() > 0
    with pytest.raises(ValueError, match="does not match"):
        overlay_segments(image, seg[:1], None)


def test_preview_is_saved_and_inlined(tmp_path):
    sheet = contact_sheet([Image.new("RGB", (64, 32), "red"), Image.new("RGB", (32, 32), "blue")], height=16)
    assert sheet.size == (32 + 4 + 16, 16)
    markdown = save_preview(sheet, tmp_path / "p" / "x.png")
    inline = base64.b64decode(markdown.removeprefix("![preview](data:image/png;base64,").removesuffix(")"))
    assert inline == (tmp_path / "p" / "x.png").read_bytes()
    assert Image.open(io.BytesIO(inline)).size == sheet.size


def test_failure_counts_by_reason():
    table = pa.table({"error": [None, "truncated", "no_person", "truncated"]})
    assert failure_counts(table) == {"no_person": 1, "truncated": 2}
