"""Fixtures of the model tests: tiny components and synthetic training shards."""

from __future__ import annotations

import pytest
import torch

from fc_pipeline.profiles import clip_tokenizer, get_profile


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a shared 2-core machine spin
    (measured: 0.3 s vs 1–12 s per tiny training step while other processes run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return clip_tokenizer(get_profile("tiny"))


@pytest.fixture
def components():
    """Fresh tiny components (seeded: identical weights on every call)."""
    from fc_pipeline.model.components import load_components

    return load_components("tiny")


def write_synthetic_shards(directory, n_samples: int = 8, per_shard: int = 4, size=(80, 64), seed: int = 0):
    """Shards in the shard layout of docs/architecture.md (``<id>.jpg``, ``<id>.json``, ``<id>.seg.png``), written
    directly with webdataset: a sky/ground picture with a man and a woman as coloured blocks."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(directory) / "train"
    out.mkdir(parents=True, exist_ok=True)
    width, height = size
    caption = "a man and a woman in a park"
    for shard in range((n_samples + per_shard - 1) // per_shard):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for number in range(shard * per_shard, min(n_samples, (shard + 1) * per_shard)):
                image = np.zeros((height, width, 3), np.uint8)
                image[: height // 2] = (120, 170, 230)
                image[height // 2 :] = (60, 150, 60)
                seg = np.zeros((height, width), np.uint16)
                x1 = int(rng.integers(4, width // 2 - 16))
                x2 = int(rng.integers(width // 2 + 2, width - 14))
                seg[16:60, x1 : x1 + 12] = 1
                seg[20:60, x2 : x2 + 12] = 2
                seg[50:, :] = np.where(seg[50:] == 0, 3, seg[50:])
                image[seg == 1] = (200, 40, 40)
                image[seg == 2] = (230, 200, 60)
                meta = {
                    "caption": caption,
                    "raw_caption": caption,
                    "subjects": [
                        {"phrase": "a man", "start": 0, "end": 5, "segment_id": 1, "score": 0.9},
                        {"phrase": "a woman", "start": 10, "end": 17, "segment_id": 2, "score": 0.8},
                    ],
                    "segments": [
                        {"id": 1, "label": "person"},
                        {"id": 2, "label": "person"},
                        {"id": 3, "label": "grass"},
                    ],
                }
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


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A tiny dataset directory with ``train/00000.tar`` and ``train/00001.tar`` (8 samples)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))
