"""Step 2: panoptic segments per image — the corpus's annotation, else Mask2Former's.

A segment is ``{id, label, category_id, isthing, score, bbox: [x1, y1, x2, y2], area}``; its
pixels are those equal to ``id`` in a uint16 id map (0 = no segment), stored as a 16-bit PNG.
bbox is inclusive-exclusive in pixels and, with area, always recomputed from the id map.

Provided annotations (``annotation`` column of the corpus) come in two accepted formats:

* **COCO panoptic**: ``<name>.panoptic.json`` holding ``segments_info`` (``[{id, category_id,
  bbox: [x, y, w, h], area, iscrowd}]``) and ``categories`` (``[{id, name, isthing}]``), either at
  the top level or as the single entry of ``annotations`` (then ``file_name`` may name the PNG);
  the PNG ``<name>.panoptic.png`` encodes ids as RGB (``id = R + 256·G + 256²·B``).
* **simplified**: ``{"segments": [{id, label, category_id, isthing, ...}]}`` with a 16-bit
  (or 8-bit grey) PNG of ids.

Ids are renumbered 1..n in the order the json lists them; provided segments get ``score`` 1.0.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from fc_pipeline.data import batches, from_pretrained, resolve_model
from fc_pipeline.images import ImageError, load_image
from fc_pipeline.pretrained import check_step_memory
from fc_pipeline.profiles import ModelProfile, get_profile
from fc_pipeline.settings import torch_dtype
from fc_pipeline.storage import atomic_write

logger = logging.getLogger(__name__)

# The 80 COCO "thing" classes; every other COCO-panoptic label is "stuff" (sky, grass, ...).
COCO_THING_LABELS = frozenset(
    name.replace("_", " ")
    for name in """
    person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
    parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
    handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove
    skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple
    sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed
    dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
    refrigerator book clock vase scissors teddy_bear hair_drier toothbrush
    """.split()
)
MAX_SEGMENTS = 65535  # ids must fit the 16-bit PNG

SEGMENTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seg_path", pa.string()),
        ("segments", pa.string()),
        ("segment_source", pa.string()),
        ("error", pa.string()),
    ]
)


class AnnotationError(ValueError):
    """A provided panoptic annotation that cannot be used (ledger reason ``bad_annotation``)."""


class Segmenter:
    """Mask2Former panoptic segmenter of a model profile, with configurable post-processing."""

    def __init__(
        self,
        profile: ModelProfile | str = "tiny",
        device: str = "cpu",
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        dtype: torch.dtype | str | None = None,
    ):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        self.profile = get_profile(profile)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.threshold = threshold
        self.mask_threshold = mask_threshold
        self.overlap_mask_area_threshold = overlap_mask_area_threshold
        check_step_memory("segment", self.profile, self.device, self.dtype)
        if self.profile.tiny:
            self.processor, self.model = _tiny_mask2former(self.profile)
        else:
            model_id, offline = self.profile.segmenter, self.profile.offline
            self.processor = from_pretrained(
                Mask2FormerImageProcessor.from_pretrained, model_id, "segmenter", local_files_only=offline
            )
            self.model = from_pretrained(
                Mask2FormerForUniversalSegmentation.from_pretrained, model_id, "segmenter", local_files_only=offline
            )
        self.model.to(self.device, self.dtype).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.stuff_label_ids = {k for k, label in self.id2label.items() if label not in COCO_THING_LABELS}

    @torch.inference_mode()
    def segment(self, images: list[Image.Image]) -> list[tuple[np.ndarray, list[dict]]]:
        """``(uint16 id map HxW, segments)`` per image."""
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerForUniversalSegmentationOutput,
        )

        if not images:
            return []
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        pixel_mask = inputs["pixel_mask"].to(self.device)
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        padded_h, padded_w = pixel_values.shape[-2:]
        mask_h, mask_w = outputs.masks_queries_logits.shape[-2:]
        results = []
        for index, image in enumerate(images):
            # The processor pads a batch to its largest image; the post-processing would stretch
            # the padding into the picture, so each image's mask logits are cropped first.
            valid = pixel_mask[index].bool()
            rows = int(np.ceil(int(valid.any(1).sum()) * mask_h / padded_h))
            cols = int(np.ceil(int(valid.any(0).sum()) * mask_w / padded_w))
            single = Mask2FormerForUniversalSegmentationOutput(
                class_queries_logits=outputs.class_queries_logits[index : index + 1].float(),
                masks_queries_logits=outputs.masks_queries_logits[index : index + 1, :, :rows, :cols].float(),
            )
            panoptic = self.processor.post_process_panoptic_segmentation(
                single,
                threshold=self.threshold,
                mask_threshold=self.mask_threshold,
                overlap_mask_area_threshold=self.overlap_mask_area_threshold,
                label_ids_to_fuse=self.stuff_label_ids,
                target_sizes=[(image.height, image.width)],
            )[0]
            id_map = panoptic["segmentation"].cpu().numpy()
            segments = [
                {
                    "id": int(info["id"]),
                    "label": self.id2label[int(info["label_id"])],
                    "category_id": int(info["label_id"]),
                    "isthing": int(info["label_id"]) not in self.stuff_label_ids,
                    "score": round(float(info["score"]), 6),
                }
                for info in panoptic["segments_info"]
            ]
            results.append(renumber_segments(np.where(id_map < 0, 0, id_map), segments))
        return results


def _tiny_mask2former(profile: ModelProfile):
    """A random Mask2Former (Swin backbone) from ``TINY_CONFIGS["segmenter"]``."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    config = dict(profile.tiny_configs["segmenter"])
    labels = config.pop("labels")
    processor = Mask2FormerImageProcessor(
        size={"shortest_edge": config.pop("shortest_edge"), "longest_edge": config.pop("longest_edge")},
        size_divisor=32,
    )
    backbone = dict(config.pop("backbone_config"))
    backbone.pop("model_type")
    model_config = Mask2FormerConfig(
        backbone_config=SwinConfig(**backbone),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        use_pretrained_backbone=False,
        **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        model = Mask2FormerForUniversalSegmentation(model_config)
    return processor, model


def renumber_segments(id_map: np.ndarray, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Keep the listed segments that have pixels, renumbered 1..n; recompute bbox and area.

    Pixels whose id is not listed become 0 (no segment).
    """
    if len(segments) > MAX_SEGMENTS:
        raise AnnotationError(f"{len(segments)} segments do not fit a 16-bit id map")
    out_map = np.zeros(id_map.shape, dtype=np.uint16)
    out_segments = []
    for segment in segments:
        mask = id_map == segment["id"]
        if not mask.any():
            continue
        new_id = len(out_segments) + 1
        out_map[mask] = new_id
        ys, xs = np.nonzero(mask)
        out_segments.append(
            {
                "id": new_id,
                "label": str(segment["label"]),
                "category_id": int(segment["category_id"]),
                "isthing": bool(segment["isthing"]),
                "score": float(segment.get("score", 1.0)),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "area": int(mask.sum()),
            }
        )
    return out_map, out_segments


def load_annotation(annotation: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """Read a provided annotation (either format of the module docstring) for an image of ``size`` (w, h)."""
    path = Path(annotation)
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: unreadable json ({exc})") from None
    if not isinstance(meta, dict):
        raise AnnotationError(f"{path}: expected a json object")
    if "segments" in meta:
        segments = meta["segments"]
        png = path.with_name(path.name.removesuffix(".json") + ".png")
    else:
        if "annotations" in meta:
            if len(meta["annotations"]) != 1:
                raise AnnotationError(f"{path}: expected one entry in 'annotations', found {len(meta['annotations'])}")
            entry = meta["annotations"][0]
        else:
            entry = meta
        if "segments_info" not in entry:
            raise AnnotationError(f"{path}: neither 'segments' nor 'segments_info' found")
        categories = {c["id"]: c for c in meta.get("categories", [])}
        try:
            segments = [
                {
                    "id": info["id"],
                    "label": categories[info["category_id"]]["name"],
                    "category_id": info["category_id"],
                    "isthing": categories[info["category_id"]].get("isthing", 0),
                }
                for info in entry["segments_info"]
            ]
        except KeyError as exc:
            raise AnnotationError(f"{path}: segment or category table lacks {exc}") from None
        png = (
            path.parent / entry["file_name"]
            if entry.get("file_name")
            else path.with_name(path.name.removesuffix(".json") + ".png")
        )
    try:
        for segment in segments:
            segment["id"], segment["label"], segment["category_id"] = (
                int(segment["id"]),
                str(segment["label"]),
                int(segment["category_id"]),
            )
            segment["isthing"] = bool(segment.get("isthing", segment["label"] in COCO_THING_LABELS))
    except (KeyError, TypeError, ValueError) as exc:
        raise AnnotationError(f"{path}: malformed segment ({exc!r})") from None
    id_map = _read_annotation_map(png)
    if id_map.shape != (size[1], size[0]):
        raise AnnotationError(f"{png}: id map is {id_map.shape[1]}x{id_map.shape[0]}, image is {size[0]}x{size[1]}")
    return renumber_segments(id_map, segments)


def _read_annotation_map(png: Path) -> np.ndarray:
    try:
        with Image.open(png) as image:
            image.load()
            if image.mode in ("RGB", "RGBA"):  # COCO panoptic: id = R + 256 G + 256² B
                rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
                return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            return np.asarray(image).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as exc:
        raise AnnotationError(f"{png}: unreadable id map ({exc})") from None


def encode_id_map(id_map: np.ndarray) -> bytes:
    """A uint16 id map as 16-bit greyscale PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(id_map, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_id_map(source: str | Path | bytes) -> np.ndarray:
    """A segment id map (uint16) from a 16-bit PNG path or its bytes."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return np.asarray(image).astype(np.uint16)


def segment_corpus(
    corpus: pa.Table,
    segmenter: Segmenter | Callable[[], Segmenter] | None,
    out_dir: str | Path,
    batch_size: int = 4,
) -> pa.Table:
    """Segments of every image of ``corpus``; id maps are written to ``out_dir/<id>.png``.

    Columns ``id, seg_path, segments`` (JSON list), ``segment_source ("provided"|"model"), error``.
    The segmenter (or its factory) is only used for readable images without an annotation.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = corpus.select(["id", "path", "width", "height", "annotation", "error"]).to_pylist()
    out = {
        row["id"]: {"id": row["id"], "seg_path": None, "segments": "[]", "segment_source": None, "error": row["error"]}
        for row in rows
    }
    todo = []
    for row in rows:
        if row["error"] is not None:
            continue
        if row["annotation"] is None:
            todo.append(row)
            continue
        try:
            id_map, segments = load_annotation(row["annotation"], (row["width"], row["height"]))
        except AnnotationError as exc:
            logger.warning("image %s: %s", row["id"], exc)
            out[row["id"]].update(segment_source="provided", error="bad_annotation")
            continue
        out[row["id"]].update(_store(id_map, segments, out_dir / f"{row['id']}.png"), segment_source="provided")
    if todo:
        model = resolve_model(segmenter, "segment", "segmenter")
        with tqdm(total=len(todo), desc="segment", disable=len(todo) < 2 * batch_size) as progress:
            for batch in batches(todo, batch_size):
                for image_id, result in _segment_batch(model, batch):
                    out[image_id]["segment_source"] = "model"
                    if isinstance(result, str):
                        out[image_id]["error"] = result
                    else:
                        out[image_id].update(_store(*result, out_dir / f"{image_id}.png"))
                progress.update(len(batch))
    return pa.Table.from_pylist(list(out.values()), schema=SEGMENTS_SCHEMA)


def _store(id_map: np.ndarray, segments: list[dict], path: Path) -> dict:
    """Write the id map; the row fields for it (``no_segments`` when there is none)."""
    if not segments:
        return {"error": "no_segments"}
    with atomic_write(path) as handle:
        handle.write(encode_id_map(id_map))
    return {"seg_path": str(path), "segments": json.dumps(segments), "error": None}


def _segment_batch(model, batch: list[dict]) -> list[tuple[str, tuple | str]]:
    """``(id, (id_map, segments) or reason)`` per row; a failing batch is retried image by image."""
    results, images, loaded = [], [], []
    for row in batch:
        try:
            images.append(load_image(row["path"]))
            loaded.append(row["id"])
        except ImageError as exc:
            results.append((row["id"], exc.reason))
    try:
        outputs = model.segment(images)
    except Exception:  # find the image that breaks the model; the others keep their segments
        logger.warning("segmenting a batch of %d failed; retrying one by one", len(images), exc_info=True)
        outputs = [_segment_one(model, image, image_id) for image, image_id in zip(images, loaded)]
    return results + list(zip(loaded, outputs))


def _segment_one(model, image: Image.Image, image_id: str) -> tuple | str:
    try:
        return model.segment([image])[0]
    except Exception:
        logger.warning("segmenting image %s failed", image_id, exc_info=True)
        return "segmentation_failed"
