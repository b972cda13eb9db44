"""Synthetic training shards in the shard format of docs/architecture.md, for tests and benchmarks.

Each sample is a sky/ground picture with a man and a woman drawn as coloured blocks, their
segment map and the metadata that names them as subjects, written directly with webdataset.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTION = "a man and a woman in a park"
SUBJECTS = [
    {"phrase": "a man", "start": 0, "end": 5, "segment_id": 1, "score": 0.9},
    {"phrase": "a woman", "start": 10, "end": 17, "segment_id": 2, "score": 0.8},
]
SEGMENTS = [{"id": 1, "label": "person"}, {"id": 2, "label": "person"}, {"id": 3, "label": "grass"}]


def write_synthetic_shards(
    directory: str | Path, n_samples: int = 8, per_shard: int = 4, size: tuple[int, int] = (80, 64), seed: int = 0
) -> Path:
    """``<directory>/train/00000.tar …`` with ``n_samples`` samples, ``per_shard`` per tar, images of
    ``size`` (width, height); returns ``directory``."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out = Path(directory) / "train"
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    sy, sx = height / 64, width / 80  # the figure layout is drawn for 80×64 and scaled
    block = max(2, round(12 * sx))
    for shard in range((n_samples + per_shard - 1) // per_shard):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for number in range(shard * per_shard, min(n_samples, (shard + 1) * per_shard)):
                image = np.zeros((height, width, 3), np.uint8)
                image[: height // 2] = (120, 170, 230)
                image[height // 2 :] = (60, 150, 60)
                seg = np.zeros((height, width), np.uint16)
                x1 = int(rng.integers(round(4 * sx), width // 2 - round(16 * sx)))
                x2 = int(rng.integers(width // 2 + round(2 * sx), width - round(14 * sx)))
                seg[round(16 * sy) : round(60 * sy), x1 : x1 + block] = 1
                seg[round(20 * sy) : round(60 * sy), x2 : x2 + block] = 2
                ground = round(50 * sy)
                seg[ground:, :] = np.where(seg[ground:] == 0, 3, seg[ground:])
                image[seg == 1] = (200, 40, 40)
                image[seg == 2] = (230, 200, 60)
                meta = {"caption": CAPTION, "raw_caption": CAPTION, "subjects": SUBJECTS, "segments": SEGMENTS}
                jpg, png = io.BytesIO(), io.BytesIO()
                Image.fromarray(image).save(jpg, format="JPEG", quality=95)
                Image.fromarray(seg).save(png, format="PNG")
                sink.write(
                    {
                        "__key__": f"{number:016x}",
                        "jpg": jpg.getvalue(),
                        "json": json.dumps(meta).encode(),
                        "seg.png": png.getvalue(),
                    }
                )
    return Path(directory)
