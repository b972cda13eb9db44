"""A small offline demo corpus: procedurally drawn scenes with people-like figures.

Nothing is downloaded and every byte is deterministic, so image ids (sha256 of the bytes) are
stable across machines. The corpus exercises every branch of the dataset chain:

* scenes with a provided caption *and* a provided panoptic annotation — their subjects exist
  even with the tiny random models (including plurals such as "two women standing ...");
* scenes with only a caption, and bare scenes, which go through the captioner and segmenter;
* one truncated JPEG, so the failure ledger is never empty.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fc_pipeline.storage import atomic_write, write_json

DEFAULT_SIZE = 24
DEMO_CORPUS = "demo"  # the corpus (Dagster partition) name the demo corpus is drawn under
CORRUPT_NAME = "broken_upload.jpg"
MARKER_NAME = ".demo_corpus.json"
# Bump when the drawing changes: a corpus made by another version is redrawn.
DEMO_VERSION = 1

# COCO-panoptic categories the scenes use: name -> (category id, isthing).
CATEGORIES: dict[str, tuple[int, bool]] = {
    "person": (1, True),
    "dog": (18, True),
    "kite": (38, True),
    "house": (128, False),
    "road": (149, False),
    "sand": (154, False),
    "sea": (155, False),
    "snow": (159, False),
    "tree-merged": (184, False),
    "sky-other-merged": (187, False),
    "grass-merged": (193, False),
    "mountain-merged": (195, False),
}


@dataclass(frozen=True)
class DemoScene:
    """One image of the demo corpus: what is drawn and what the corpus provides with it."""

    name: str
    setting: str  # park | beach | street | snow
    people: int
    caption: str | None = None
    annotated: bool = False
    extras: tuple[str, ...] = ()  # "dog", "kite", "tree", "house", "mountain"
    size: tuple[int, int] = (320, 240)
    fmt: str = "jpg"
    figure_scale: float = 1.0  # < 1 for children


# Interleaved so that any prefix mixes annotated, caption-only and bare scenes.
SCENES: tuple[DemoScene, ...] = (
    DemoScene("park_man", "park", 1, "a man standing in a park", True, ("tree",)),
    DemoScene("two_women", "park", 2, "two women standing on the grass", True),
    DemoScene("street_cyclist", "street", 1, "a man riding a bicycle down the street", False, ("house",)),
    DemoScene("bare_beach_1", "beach", 2),
    DemoScene("snow_children", "snow", 3, "three children playing in the snow", True, ("mountain",), figure_scale=0.7),
    DemoScene("beach_woman", "beach", 1, "a woman walking on the beach", True, (), (256, 320), "png"),
    DemoScene("couple_house", "street", 2, "a man and a woman standing in front of a house", True, ("house",)),
    DemoScene("bare_park_1", "park", 0, extras=("tree", "dog")),
    DemoScene("kite_boy", "park", 1, "a boy flying a red kite in a field", True, ("kite",), figure_scale=0.75),
    DemoScene("family_picnic", "park", 3, "a family having a picnic in the park", False, ("tree",)),
    DemoScene("street_men", "street", 2, "two men talking on a street", True, ("house",), fmt="webp"),
    DemoScene("bare_snow_1", "snow", 1, extras=("mountain",)),
    DemoScene("old_woman_tree", "park", 1, "an old woman standing next to a tree", True, ("tree",)),
    DemoScene("girl_dog", "beach", 1, "a girl and her dog on the beach", True, ("dog",), figure_scale=0.75),
    DemoScene("bare_street_1", "street", 3, extras=("house",), fmt="png"),
    DemoScene("four_people", "street", 4, "4 people standing in a row", True),
    DemoScene("beach_couple", "beach", 2, "a couple walking on the beach at sunset", False),
    DemoScene("bare_beach_2", "beach", 0),
    DemoScene("yellow_shirt", "snow", 1, "a woman in a yellow shirt standing in the snow", True, ("mountain",)),
    DemoScene("two_boys_beach", "beach", 2, "two boys playing on the beach", True, (), (256, 320), figure_scale=0.75),
    DemoScene("skier", "snow", 1, "a skier standing on a snowy hill", False, ("mountain",)),
    DemoScene("bare_park_2", "park", 2, extras=("tree",)),
    DemoScene("bare_snow_2", "snow", 0, extras=("mountain",), fmt="png"),
)


def demo_scenes(n: int = DEFAULT_SIZE) -> list[DemoScene]:
    """The first ``n - 1`` scenes (cycling with numbered copies past the script's end)."""
    if n < 2:
        raise ValueError(f"a demo corpus needs n >= 2 (scenes + the corrupt file), got {n}")
    scenes = []
    for i in range(n - 1):
        scene = SCENES[i % len(SCENES)]
        if i >= len(SCENES):
            scene = DemoScene(**{**scene.__dict__, "name": f"{scene.name}_{i // len(SCENES)}"})
        scenes.append(scene)
    return scenes


def make_demo_corpus(directory: str | Path, n: int = DEFAULT_SIZE) -> Path:
    """Write the demo corpus of ``n`` files (``n - 1`` scenes + one corrupt JPEG) into ``directory``.

    Beside each image: ``<name>.txt`` when the scene has a provided caption, and
    ``<name>.panoptic.json`` + ``<name>.panoptic.png`` (COCO panoptic) when it is annotated.
    Idempotent: a complete corpus of the same size and version is left untouched.
    """
    directory = Path(directory)
    marker = directory / MARKER_NAME
    expected = {"version": DEMO_VERSION, "n": n}
    if marker.exists() and json.loads(marker.read_text()) == expected:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(demo_scenes(n)):
        _write_scene(directory, scene, seed=index)
    _write_bytes(directory / CORRUPT_NAME, _encode(draw_scene(SCENES[0], seed=999)[0], "jpg")[:1500])
    write_json(expected, marker)
    return directory


def draw_scene(scene: DemoScene, seed: int = 0) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """Render a scene: the RGB image, its uint16 segment-id map and the segments' metadata."""
    rng = np.random.default_rng(seed)
    canvas = _Canvas(*scene.size, rng)
    horizon = int(canvas.height * rng.uniform(0.38, 0.5))
    _draw_background(canvas, scene, horizon)
    ground = canvas.height - 4
    if "tree" in scene.extras:
        _draw_tree(canvas, int(canvas.width * rng.uniform(0.72, 0.9)), horizon + 10)
    slots = np.linspace(0.15, 0.85, max(scene.people, 1) + 2)[1:-1] if scene.people else []
    for x in slots:
        height = canvas.height * rng.uniform(0.55, 0.7) * scene.figure_scale
        _draw_person(
            canvas, int(canvas.width * (x + rng.uniform(-0.03, 0.03))), ground - int(rng.uniform(0, 8)), int(height)
        )
    if "dog" in scene.extras:
        _draw_dog(canvas, int(canvas.width * rng.uniform(0.6, 0.8)), ground - 2, int(canvas.height * 0.12))
    if "kite" in scene.extras:
        _draw_kite(canvas, int(canvas.width * 0.75), int(horizon * 0.4), int(canvas.height * 0.12))
    return canvas.image(), canvas.ids, canvas.segments_info()


def _write_scene(directory: Path, scene: DemoScene, seed: int) -> None:
    image, ids, segments = draw_scene(scene, seed)
    image_path = directory / f"{scene.name}.{scene.fmt}"
    _write_bytes(image_path, _encode(image, scene.fmt))
    if scene.caption is not None:
        with atomic_write(directory / f"{scene.name}.txt", "w") as handle:
            handle.write(scene.caption + "\n")
    if scene.annotated:
        write_panoptic_annotation(directory / scene.name, ids, segments)


def write_panoptic_annotation(stem: Path, ids: np.ndarray, segments: list[dict]) -> None:
    """Write ``<stem>.panoptic.png`` (RGB, id = R + 256·G + 256²·B) and ``<stem>.panoptic.json``."""
    rgb = np.stack([ids % 256, (ids // 256) % 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    png = stem.parent / f"{stem.name}.panoptic.png"
    _write_bytes(png, _encode(Image.fromarray(rgb), "png"))
    used = sorted({s["category_id"] for s in segments})
    categories = [
        {"id": cid, "name": name, "isthing": int(isthing)} for name, (cid, isthing) in CATEGORIES.items() if cid in used
    ]
    annotation = {"file_name": png.name, "segments_info": segments, "categories": categories}
    write_json(annotation, stem.parent / f"{stem.name}.panoptic.json")


class _Canvas:
    """An RGB float image plus the id map of what was painted last at each pixel."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.width, self.height, self.rng = width, height, rng
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.ids = np.zeros((height, width), np.uint16)
        self.labels: dict[int, str] = {}

    def mask(self, draw) -> np.ndarray:
        """A boolean mask from a function that draws filled shapes on an ImageDraw."""
        layer = Image.new("L", (self.width, self.height), 0)
        draw(ImageDraw.Draw(layer))
        return np.asarray(layer) > 0

    def paint(self, mask: np.ndarray, color, label: str | None, shade: float = 0.0) -> None:
        """Fill ``mask`` with ``color`` (+ a vertical shade and grain); ``label`` makes it a segment."""
        rows = np.linspace(-shade, shade, self.height, dtype=np.float32)[:, None, None]
        grain = self.rng.normal(0, 6, (self.height, self.width, 1)).astype(np.float32)
        fill = np.asarray(color, np.float32)[None, None, :] * (1 + rows) + grain
        self.rgb[mask] = fill[mask]
        if label is None:
            return
        if label not in CATEGORIES:
            raise ValueError(f"unknown demo category {label!r}")
        segment_id = len(self.labels) + 1
        self.labels[segment_id] = label
        self.ids[mask] = segment_id

    def image(self) -> Image.Image:
        return Image.fromarray(np.clip(self.rgb, 0, 255).astype(np.uint8), "RGB")

    def segments_info(self) -> list[dict]:
        """COCO-panoptic ``segments_info`` of the segments still visible (bbox = x, y, w, h)."""
        segments = []
        for segment_id, label in self.labels.items():
            ys, xs = np.nonzero(self.ids == segment_id)
            if len(xs) == 0:
                continue
            category_id, isthing = CATEGORIES[label]
            x0, y0 = int(xs.min()), int(ys.min())
            segments.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "label": label,
                    "isthing": int(isthing),
                    "iscrowd": 0,
                    "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                    "area": int(len(xs)),
                }
            )
        return segments


_GROUND = {
    "park": ("grass-merged", (86, 150, 70)),
    "beach": ("sand", (222, 200, 150)),
    "street": ("road", (120, 120, 125)),
    "snow": ("snow", (235, 240, 248)),
}


def _draw_background(canvas: _Canvas, scene: DemoScene, horizon: int) -> None:
    w, h = canvas.width, canvas.height
    sky = canvas.mask(lambda d: d.rectangle([0, 0, w, horizon], fill=1))
    canvas.paint(sky, (135, 185, 235), "sky-other-merged", shade=0.15)
    label, color = _GROUND[scene.setting]
    canvas.paint(canvas.mask(lambda d: d.rectangle([0, horizon, w, h], fill=1)), color, label, shade=0.1)
    if scene.setting == "beach":
        sea = canvas.mask(lambda d: d.rectangle([0, horizon, w, horizon + h // 10], fill=1))
        canvas.paint(sea, (40, 110, 170), "sea")
    if "mountain" in scene.extras:
        peak = int(w * canvas.rng.uniform(0.3, 0.7))
        mountain = canvas.mask(
            lambda d: d.polygon([(peak - w // 2, horizon), (peak, horizon // 3), (peak + w // 2, horizon)], fill=1)
        )
        canvas.paint(mountain, (125, 130, 150), "mountain-merged")
    if "house" in scene.extras:
        x0 = int(w * canvas.rng.uniform(0.05, 0.5))
        x1, top = x0 + w // 3, horizon - h // 5

        def house(d):
            d.rectangle([x0, top, x1, horizon + 6], fill=1)
            d.polygon([(x0 - 6, top), ((x0 + x1) // 2, top - h // 8), (x1 + 6, top)], fill=1)

        canvas.paint(canvas.mask(house), (170, 90, 70), "house")


def _draw_tree(canvas: _Canvas, x: int, base: int) -> None:
    r = canvas.height // 7

    def tree(d):
        d.rectangle([x - r // 5, base - 2 * r, x + r // 5, base], fill=1)
        d.ellipse([x - r, base - 3 * r, x + r, base - int(1.4 * r)], fill=1)

    canvas.paint(canvas.mask(tree), (45, 105, 45), "tree-merged")


_SKIN = ((241, 194, 160), (198, 134, 96), (141, 85, 54), (224, 172, 130))
_CLOTHES = ((200, 40, 40), (40, 70, 180), (240, 200, 40), (60, 150, 80), (150, 60, 160), (30, 30, 30))


def _draw_person(canvas: _Canvas, x: int, feet: int, height: int) -> None:
    """A standing figure: head, torso, arms and legs, proportions of a ~7-head-tall adult."""
    rng = canvas.rng
    skin = _SKIN[rng.integers(len(_SKIN))]
    shirt, trousers = (_CLOTHES[i] for i in rng.choice(len(_CLOTHES), 2, replace=False))
    unit = height / 7.0
    head_r = unit / 2
    neck = feet - height + 2 * head_r
    hip = neck + 2.6 * unit
    shoulder = 1.0 * unit

    def person(d):
        d.ellipse([x - head_r, feet - height, x + head_r, neck], fill=1)
        d.rounded_rectangle([x - shoulder, neck, x + shoulder, hip], radius=unit / 3, fill=1)
        for side in (-1, 1):
            d.line(
                [(x + side * shoulder * 0.9, neck + 0.3 * unit), (x + side * 1.4 * shoulder, hip)],
                fill=1,
                width=max(2, int(unit / 2.5)),
            )
            d.line(
                [(x + side * shoulder * 0.45, hip), (x + side * shoulder * 0.6, feet)],
                fill=1,
                width=max(2, int(unit / 2)),
            )

    whole = canvas.mask(person)
    canvas.paint(whole, skin, "person")
    # clothes colour the same segment: paint them over the figure without a new id
    torso = canvas.mask(lambda d: d.rounded_rectangle([x - shoulder, neck, x + shoulder, hip], radius=unit / 3, fill=1))
    legs = whole & (np.arange(canvas.height)[:, None] > hip)
    canvas.paint(torso & whole, shirt, None)
    canvas.paint(legs, trousers, None)


def _draw_dog(canvas: _Canvas, x: int, feet: int, size: int) -> None:
    def dog(d):
        d.ellipse([x - size, feet - size, x + size * 0.6, feet - size * 0.4], fill=1)
        d.ellipse([x + size * 0.4, feet - size * 1.3, x + size, feet - size * 0.7], fill=1)
        for dx in (-0.8, -0.5, 0.1, 0.4):
            d.rectangle([x + dx * size, feet - size * 0.6, x + dx * size + size * 0.15, feet], fill=1)

    canvas.paint(canvas.mask(dog), (140, 95, 55), "dog")


def _draw_kite(canvas: _Canvas, x: int, y: int, size: int) -> None:
    kite = canvas.mask(
        lambda d: d.polygon([(x, y - size), (x + size // 2, y), (x, y + size), (x - size // 2, y)], fill=1)
    )
    canvas.paint(kite, (220, 30, 30), "kite")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, "JPEG", quality=90)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=90)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)
