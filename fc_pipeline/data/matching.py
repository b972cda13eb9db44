"""Step 4: which noun phrase names which segment.

score(phrase, segment) = CLIP(segment crop, phrase) × SBERT(segment label, phrase), where the
CLIP cosine is mapped from [-1, 1] to [0, 1] and the SBERT cosine clamped at 0, so that the product
grows with each factor (two negative cosines must not multiply into a good match). Between
segments of the same label SBERT ties and CLIP decides ("a man in red" vs "a woman"); across
labels SBERT dominates — which also keeps a random tiny CLIP from deciding everything. The
crop is the segment's bounding box with the pixels of other segments greyed out. Pairs are taken
greedily, best first, while above the threshold; each phrase and segment is used once. Subjects
are the matched ``person`` segments (at most ``max_subjects``, best scores kept).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm.auto import tqdm

from fc_pipeline.data import from_pretrained, resolve_model
from fc_pipeline.data.segmentation import read_id_map
from fc_pipeline.images import ImageError, load_image
from fc_pipeline.pretrained import check_step_memory
from fc_pipeline.profiles import ModelProfile, get_profile, sbert_path
from fc_pipeline.settings import torch_dtype

logger = logging.getLogger(__name__)

SUBJECT_LABEL = "person"
# A right pair scores about (1 + 0.3)/2 × 0.5 ≈ 0.3 with real models, a wrong one about
# (1 + 0.1)/2 × 0.2 ≈ 0.1; a random tiny CLIP gives 0.45–0.65 for the first factor, so there the
# bar is lower and SBERT decides.
DEFAULT_THRESHOLDS = {"paper": 0.2, "tiny": 0.1}
CROP_FILL = (122, 116, 104)  # CLIP's mean colour: neutral for the image tower

MATCHES_SCHEMA = pa.schema(
    [("id", pa.string()), ("subjects", pa.string()), ("n_subjects", pa.int32()), ("error", pa.string())]
)


def greedy_match(scores: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """One-to-one ``(row, column, score)`` pairs of ``scores``, best first, each score > threshold.

    Ties go to the lower row, then the lower column; NaN never matches.
    """
    scores = np.array(scores, dtype=np.float64)
    scores[np.isnan(scores)] = -np.inf
    pairs = []
    while scores.size:
        row, column = np.unravel_index(np.argmax(scores), scores.shape)
        best = float(scores[row, column])
        if not best > threshold:
            break
        pairs.append((int(row), int(column), best))
        scores[row, :] = -np.inf
        scores[:, column] = -np.inf
    return pairs


def readable_label(label: str) -> str:
    """COCO-panoptic label as words for SBERT: ``"sky-other-merged"`` -> ``"sky"``."""
    label = re.sub(r"-(other|merged|stuff)\b", "", label)
    return label.replace("-", " ").replace("_", " ").strip()


class SubjectMatcher:
    """OpenCLIP image–text × SBERT label–phrase scorer of a model profile."""

    def __init__(
        self, profile: ModelProfile | str = "tiny", device: str = "cpu", dtype: torch.dtype | str | None = None
    ):
        import open_clip
        from sentence_transformers import SentenceTransformer

        self.profile = get_profile(profile)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        check_step_memory("match", self.profile, self.device, self.dtype)
        if self.profile.tiny:
            config = self.profile.tiny_configs["matcher_clip"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.profile.seed)
                self.clip = open_clip.CLIP(**config)
            self.preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
        else:
            # ``matcher_clip_pretrained`` is an open_clip tag or a local weights file; a model store
            # names a ``local-dir:`` folder (config + weights) instead and no tag
            name, weights = self.profile.matcher_clip, self.profile.matcher_clip_pretrained
            self.clip, _, self.preprocess = from_pretrained(
                lambda _: open_clip.create_model_and_transforms(name, pretrained=weights or None),
                f"{name} ({weights})",
                "matcher_clip_pretrained",
            )
            self.tokenizer = open_clip.get_tokenizer(self.profile.matcher_clip)
        self.clip.to(self.device, self.dtype).eval()
        self.sbert = from_pretrained(
            lambda path: SentenceTransformer(path, device=str(self.device), local_files_only=self.profile.offline),
            sbert_path(self.profile),
            "sbert",
        )
        self.default_threshold = DEFAULT_THRESHOLDS["tiny" if self.profile.tiny else "paper"]

    @torch.inference_mode()
    def clip_similarity(self, crops: list[Image.Image], texts: list[str]) -> np.ndarray:
        """Cosine similarity ``[len(crops), len(texts)]`` of CLIP image and text embeddings."""
        pixels = torch.stack([self.preprocess(crop) for crop in crops]).to(self.device, self.dtype)
        tokens = self.tokenizer(texts).to(self.device)
        image_embeds = self.clip.encode_image(pixels, normalize=True)
        text_embeds = self.clip.encode_text(tokens, normalize=True)
        return (image_embeds @ text_embeds.T).float().cpu().numpy()

    def label_similarity(self, labels: list[str], texts: list[str]) -> np.ndarray:
        """Cosine similarity ``[len(labels), len(texts)]`` of SBERT embeddings."""
        embeds = self.sbert.encode(
            [readable_label(label) for label in labels] + list(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeds[: len(labels)] @ embeds[len(labels) :].T

    def score(self, image: Image.Image, id_map: np.ndarray, segments: list[dict], phrases: list[str]) -> np.ndarray:
        """``[len(phrases), len(segments)]`` matching scores: (1 + CLIP)/2 × max(SBERT, 0)."""
        if not phrases or not segments:
            return np.zeros((len(phrases), len(segments)))
        crops = [segment_crop(image, id_map, segment) for segment in segments]
        clip = (1.0 + self.clip_similarity(crops, phrases)) / 2.0
        sbert = np.clip(self.label_similarity([s["label"] for s in segments], phrases), 0, None)
        return (clip * sbert).T


def segment_crop(image: Image.Image, id_map: np.ndarray, segment: dict) -> Image.Image:
    """The segment's bounding box, with pixels outside the segment set to :data:`CROP_FILL`."""
    x1, y1, x2, y2 = segment["bbox"]
    pixels = np.array(image.crop((x1, y1, x2, y2)))
    outside = id_map[y1:y2, x1:x2] != segment["id"]
    pixels[outside] = CROP_FILL
    return Image.fromarray(pixels)


def match_subjects(
    scores: np.ndarray,
    phrases: list[dict],
    segments: list[dict],
    threshold: float,
    max_subjects: int,
) -> tuple[list[dict], str | None]:
    """Subjects ``{phrase, start, end, segment_id, score}`` in caption order, and an error code.

    The error is ``no_match`` when no pair clears the threshold, ``no_person`` when no matched
    segment is a person.
    """
    pairs = greedy_match(scores, threshold)
    if not pairs:
        return [], "no_match"
    people = [(p, s, score) for p, s, score in pairs if segments[s]["label"] == SUBJECT_LABEL][:max_subjects]
    subjects = [
        {
            "phrase": phrases[p]["text"],
            "start": phrases[p]["start"],
            "end": phrases[p]["end"],
            "segment_id": segments[s]["id"],
            "score": round(score, 6),
        }
        for p, s, score in sorted(people, key=lambda pair: phrases[pair[0]]["start"])
    ]
    return subjects, None if subjects else "no_person"


def match_corpus(
    corpus: pa.Table,
    segments: pa.Table,
    phrases: pa.Table,
    matcher: SubjectMatcher | Callable[[], SubjectMatcher] | None,
    threshold: float | None = None,
    max_subjects: int = 4,
) -> pa.Table:
    """Subjects of every image: columns ``id, subjects`` (JSON list), ``n_subjects, error``.

    ``threshold`` None means the matcher's profile default (:data:`DEFAULT_THRESHOLDS`). The
    first upstream error of an image (corpus, segments, phrases) is carried forward.
    """
    segment_rows = {row["id"]: row for row in segments.to_pylist()}
    phrase_rows = {row["id"]: row for row in phrases.to_pylist()}
    out = {}
    todo = []
    for row in corpus.select(["id", "path", "error"]).to_pylist():
        seg, phr = segment_rows.get(row["id"]), phrase_rows.get(row["id"])
        error = row["error"] or _missing_or_error(seg, "segments") or _missing_or_error(phr, "phrases")
        out[row["id"]] = {"id": row["id"], "subjects": "[]", "n_subjects": 0, "error": error}
        if error is None:
            todo.append((row, seg, phr))
    if todo:
        model = resolve_model(matcher, "score", "subject matcher")
        if threshold is None:
            threshold = getattr(model, "default_threshold", DEFAULT_THRESHOLDS["paper"])
        for row, seg, phr in tqdm(todo, desc="match", disable=len(todo) < 16):
            subjects, error = _match_image(model, row, seg, phr, threshold, max_subjects)
            out[row["id"]].update(subjects=json.dumps(subjects), n_subjects=len(subjects), error=error)
    return pa.Table.from_pylist(list(out.values()), schema=MATCHES_SCHEMA)


def _missing_or_error(row: dict | None, step: str) -> str | None:
    if row is None:
        raise ValueError(f"the {step} table has no row for an image of the corpus; re-run that step")
    return row["error"]


def _match_image(model, row: dict, seg: dict, phr: dict, threshold: float, max_subjects: int):
    try:
        image = load_image(row["path"])
    except ImageError as exc:
        return [], exc.reason
    segments = json.loads(seg["segments"])
    phrases = json.loads(phr["phrases"])
    scores = model.score(image, read_id_map(seg["seg_path"]), segments, [p["text"] for p in phrases])
    return match_subjects(scores, phrases, segments, threshold, max_subjects)
