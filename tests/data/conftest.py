"""A small procedurally drawn corpus with every kind of input the dataset chain must survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SIZE = (96, 64)  # width, height


def draw_scene(people: int, seed: int, size=SIZE, extra: str | None = None) -> tuple[Image.Image, np.ndarray, list]:
    """An image with ``people`` stick figures on grass (+ an optional car), its id map and labels."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(120, 200, 3)))
    ids = Image.new("I", size, 0)
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    labels = []
    grass_top = height * 3 // 4
    draw.rectangle([0, grass_top, width, height], fill=(40, 160, 40))
    draw_ids.rectangle([0, grass_top, width, height], fill=1)
    labels.append((1, "grass-merged"))
    slot = width // max(people + (1 if extra else 0), 1)
    for k in range(people):
        x = k * slot + slot // 2
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        box = [x - 8, 10, x + 8, grass_top + 6]
        draw.ellipse(box, fill=colour)
        draw_ids.ellipse(box, fill=k + 2)
        labels.append((k + 2, "person"))
    if extra:
        x = people * slot + 4
        draw.rectangle([x, grass_top - 14, x + 24, grass_top + 4], fill=(200, 0, 0))
        draw_ids.rectangle([x, grass_top - 14, x + 24, grass_top + 4], fill=people + 2)
        labels.append((people + 2, extra))
    return image, np.asarray(ids, dtype=np.int64), labels


CATEGORY_IDS = {"person": 1, "car": 3, "dog": 18, "grass-merged": 125}


def write_simple_annotation(stem: Path, id_map: np.ndarray, labels: list) -> None:
    """The simplified format: {"segments": [...]} + a 16-bit PNG of ids."""
    segments = [
        {"id": i, "label": label, "category_id": CATEGORY_IDS[label], "isthing": label != "grass-merged"}
        for i, label in labels
    ]
    stem.with_name(stem.name + ".panoptic.json").write_text(json.dumps({"segments": segments}))
    Image.fromarray(id_map.astype(np.uint16)).save(stem.with_name(stem.name + ".panoptic.png"))


def write_coco_annotation(stem: Path, id_map: np.ndarray, labels: list) -> None:
    """COCO panoptic: segments_info + categories, ids RGB-encoded (large ids on purpose)."""
    coco_ids = {i: 1000 * i + 7 for i, _ in labels}
    encoded = np.zeros(id_map.shape, dtype=np.int64)
    for i, coco_id in coco_ids.items():
        encoded[id_map == i] = coco_id
    rgb = np.stack([encoded % 256, (encoded // 256) % 256, encoded // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(stem.with_name(stem.name + ".panoptic.png"))
    info = [
        {"id": coco_ids[i], "category_id": CATEGORY_IDS[label], "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
        for i, label in labels
    ]
    categories = [
        {"id": cid, "name": name, "isthing": int(name != "grass-merged")} for name, cid in CATEGORY_IDS.items()
    ]
    stem.with_name(stem.name + ".panoptic.json").write_text(
        json.dumps({"segments_info": info, "categories": categories})
    )


def make_corpus(root: Path) -> dict[str, str]:
    """Write the test corpus under ``root``; returns file name -> expected ledger reason (None = sample)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def annotated(name: str, people: int, caption: str | None, seed: int, coco=False, extra=None, mode=None, save=None):
        image, id_map, labels = draw_scene(people, seed, extra=extra)
        path = root / name
        if mode == "CMYK":
            image.convert("CMYK").save(path, quality=95)
        elif mode == "I;16":
            grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(grey).save(path)
        elif mode == "RGBA":
            rgba = image.convert("RGBA")
            rgba.putalpha(200)
            rgba.save(path)
        elif save:
            save(image, path)
        else:
            image.save(path, quality=95)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
        (write_coco_annotation if coco else write_simple_annotation)(path.with_suffix(""), id_map, labels)

    annotated("duo.jpg", 2, "two women standing on the grass", seed=1)
    expected["duo.jpg"] = None
    annotated("solo.png", 1, "a man next to a red car", seed=2, coco=True, extra="car")
    expected["solo.png"] = None
    annotated("trio.jpg", 3, "3 young men on a field\n", seed=3, coco=True)
    expected["trio.jpg"] = None
    annotated("cmyk.jpg", 1, "a woman in a garden", seed=4, mode="CMYK")
    expected["cmyk.jpg"] = None
    annotated("grey16.png", 2, "two children playing", seed=5, mode="I;16")
    expected["grey16.png"] = None
    annotated("alpha.png", 1, "an old man on the lawn", seed=6, mode="RGBA")
    expected["alpha.png"] = None
    annotated("nobody.png", 0, "a red car parked on grass", seed=7, extra="car")
    expected["nobody.png"] = "no_person"

    # EXIF orientation 6: stored 64x96, displayed 96x64 (the annotation is drawn as displayed)
    def save_rotated(image: Image.Image, path: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())

    annotated("rotated.jpg", 1, "a young woman smiling", seed=8, save=save_rotated)
    expected["rotated.jpg"] = None

    # no caption, no annotation: tiny BLIP-2 captions them, tiny Mask2Former finds nothing
    for k in range(2):
        draw_scene(1, 20 + k)[0].save(root / f"plain{k}.jpg")
        expected[f"plain{k}.jpg"] = "no_segments"

    # a caption file that is only whitespace counts as no caption (the model captions it)
    draw_scene(1, 30)[0].save(root / "blank_caption.png")
    (root / "blank_caption.txt").write_text("  \n")
    expected["blank_caption.png"] = "no_segments"

    # a provided annotation whose map does not fit the image
    image, id_map, labels = draw_scene(1, 31)
    image.save(root / "badann.png")
    (root / "badann.txt").write_text("a man")
    write_simple_annotation(root / "badann", id_map[:10, :10], labels)
    expected["badann.png"] = "bad_annotation"

    # broken files
    good = (root / "duo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    expected["truncated.jpg"] = "truncated"
    (root / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty_file"
    (root / "notes.jpg").write_text("not an image")
    expected["notes.jpg"] = "unreadable"
    Image.new("1", (8200, 8000)).save(root / "bomb.png")  # 65.6 MP > 64 MP, a few kB on disk
    expected["bomb.png"] = "too_large"

    # an exact duplicate in a sub-folder collapses into duo.jpg
    (root / "sub").mkdir()
    (root / "sub" / "duo_copy.jpg").write_bytes(good)
    return expected


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="session")
def tiny_captioner():
    from fc_pipeline.data.captioning import Captioner

    return Captioner("tiny", max_new_tokens=8)


@pytest.fixture(scope="session")
def tiny_segmenter():
    from fc_pipeline.data.segmentation import Segmenter

    return Segmenter("tiny")


@pytest.fixture(scope="session")
def tiny_matcher():
    from fc_pipeline.data.matching import SubjectMatcher

    return SubjectMatcher("tiny")


@pytest.fixture(scope="session")
def built(corpus_dir, tiny_captioner, tiny_segmenter, tiny_matcher, tmp_path_factory):
    """The whole chain run once on the test corpus (two samples per shard)."""
    from fc_pipeline.data.build import build_dataset

    out = tmp_path_factory.mktemp("dataset")
    stats = build_dataset(
        corpus_dir[0],
        out,
        samples_per_shard=2,
        captioner=tiny_captioner,
        segmenter=tiny_segmenter,
        matcher=tiny_matcher,
    )
    return out, stats
