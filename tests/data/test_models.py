"""Captioning, segmentation and matching steps: real tiny models, stubs where a random model says nothing."""

import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fc_pipeline.data.captioning import caption_corpus
from fc_pipeline.data.matching import greedy_match, match_subjects, readable_label, segment_crop
from fc_pipeline.data.segmentation import load_annotation, read_id_map, renumber_segments, segment_corpus


class StubCaptioner:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def caption(self, images):
        self.calls.append(len(images))
        if any(image.size == (13, 13) for image in images):
            raise RuntimeError("model crashed")
        return [self.answers.get(image.size, "") for image in images]


def _corpus(tmp_path, sizes, captions=None):
    rows = []
    for k, size in enumerate(sizes):
        path = tmp_path / f"{k}.png"
        Image.new("RGB", size, (k * 30, 0, 0)).save(path)
        rows.append(
            {
                "id": f"id{k}",
                "path": str(path),
                "width": size[0],
                "height": size[1],
                "caption": (captions or {}).get(k),
                "annotation": None,
                "error": None,
            }
        )
    return pa.Table.from_pylist(rows)


def test_tiny_blip2_captions_a_batch(tiny_captioner):
    images = [
        Image.new("RGB", (40, 30), "red"),
        Image.new("RGB", (20, 50), "blue"),
        Image.new("L", (8, 8)).convert("RGB"),
    ]
    captions = tiny_captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == tiny_captioner.caption(images)  # greedy decoding is deterministic
    assert tiny_captioner.caption([]) == []


def test_caption_corpus_provided_model_empty_and_failure(tmp_path):
    corpus = _corpus(tmp_path, [(10, 10), (11, 11), (12, 12), (13, 13)], captions={0: "given"})
    stub = StubCaptioner({(11, 11): "  a cat  ", (12, 12): "   "})
    rows = {r["id"]: r for r in caption_corpus(corpus, stub, batch_size=8).to_pylist()}
    assert rows["id0"] == {"id": "id0", "caption": "given", "caption_source": "provided", "error": None}
    assert rows["id1"] == {"id": "id1", "caption": "a cat", "caption_source": "model", "error": None}
    assert rows["id2"]["error"] == "empty_caption" and rows["id2"]["caption"] is None
    assert rows["id3"]["error"] == "caption_failed"
    assert stub.calls == [3, 1, 1, 1]  # the failing batch is retried image by image


def test_captioner_factory_only_called_when_needed(tmp_path):
    corpus = _corpus(tmp_path, [(10, 10)], captions={0: "given"})

    def factory():
        raise AssertionError("must not build a model")

    assert caption_corpus(corpus, factory).column("caption").to_pylist() == ["given"]
    with pytest.raises(ValueError, match="captioner"):
        caption_corpus(_corpus(tmp_path, [(10, 10)]), None)


def test_tiny_mask2former_default_and_permissive_thresholds(tiny_segmenter):
    from fc_pipeline.data.segmentation import Segmenter

    images = [Image.new("RGB", (80, 60), "red"), Image.new("RGB", (40, 90), "green")]
    for id_map, segments in tiny_segmenter.segment(images):
        assert id_map.dtype == np.uint16 and segments == [] and not id_map.any()
    permissive = Segmenter("tiny", threshold=0, mask_threshold=0, overlap_mask_area_threshold=0)
    results = permissive.segment(images)
    for image, (id_map, segments) in zip(images, results):
        assert id_map.shape == (image.height, image.width)
        assert segments and [s["id"] for s in segments] == list(range(1, len(segments) + 1))
        for s in segments:
            mask = id_map == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum() and s["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert s["label"] in permissive.id2label.values() and 0 <= s["score"] <= 1
        assert set(np.unique(id_map)) <= {0} | {s["id"] for s in segments}


def test_segment_corpus_annotations_model_and_files(corpus_dir, tiny_segmenter, tmp_path):
    from fc_pipeline.data.corpus import scan_corpus

    root, expected = corpus_dir
    table = segment_corpus(scan_corpus(root), tiny_segmenter, tmp_path / "segments")
    rows = {r["id"]: r for r in table.to_pylist()}
    by_name = {r["path"].split("/")[-1]: rows[r["id"]] for r in scan_corpus(root).to_pylist()}
    solo = by_name["solo.png"]  # COCO-panoptic RGB ids 1007/2007/3007 renumbered 1..3
    assert solo["segment_source"] == "provided" and solo["error"] is None
    segments = json.loads(solo["segments"])
    assert [(s["id"], s["label"], s["category_id"], s["isthing"]) for s in segments] == [
        (1, "grass-merged", 125, False),
        (2, "person", 1, True),
        (3, "car", 3, True),
    ]
    id_map = read_id_map(solo["seg_path"])
    assert id_map.shape == (64, 96) and set(np.unique(id_map)) == {0, 1, 2, 3}
    assert segments[1]["area"] == int((id_map == 2).sum())
    assert by_name["badann.png"]["error"] == "bad_annotation"
    assert by_name["plain0.jpg"]["segment_source"] == "model" and by_name["plain0.jpg"]["error"] == "no_segments"
    assert by_name["truncated.jpg"]["error"] == "truncated" and by_name["truncated.jpg"]["seg_path"] is None
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == sorted(
        f"{r['id']}.png" for r in rows.values() if r["seg_path"]
    )


def test_load_annotation_errors(tmp_path):
    (tmp_path / "a.panoptic.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable json"):
        load_annotation(tmp_path / "a.panoptic.json", (4, 4))
    (tmp_path / "b.panoptic.json").write_text(
        json.dumps({"segments_info": [{"id": 1, "category_id": 9}], "categories": []})
    )
    with pytest.raises(ValueError, match="lacks"):
        load_annotation(tmp_path / "b.panoptic.json", (4, 4))
    (tmp_path / "c.panoptic.json").write_text(
        json.dumps({"segments": [{"id": 1, "label": "person", "category_id": 1}]})
    )
    with pytest.raises(ValueError, match="unreadable id map"):
        load_annotation(tmp_path / "c.panoptic.json", (4, 4))
    Image.fromarray(np.ones((4, 4), np.uint16)).save(tmp_path / "c.panoptic.png")
    id_map, segments = load_annotation(tmp_path / "c.panoptic.json", (4, 4))
    assert segments[0]["isthing"] is True and segments[0]["bbox"] == [0, 0, 4, 4] and id_map.sum() == 16


def test_renumber_drops_empty_and_unlisted():
    id_map = np.array([[5, 5, 9], [7, 7, 0]])
    out, segments = renumber_segments(
        id_map,
        [
            {"id": 7, "label": "a", "category_id": 1, "isthing": 1},
            {"id": 3, "label": "b", "category_id": 2, "isthing": 0},
            {"id": 5, "label": "c", "category_id": 3, "isthing": 0},
        ],
    )
    assert out.tolist() == [[2, 2, 0], [1, 1, 0]]
    assert [(s["id"], s["label"], s["area"], s["bbox"]) for s in segments] == [
        (1, "a", 2, [0, 1, 2, 2]),
        (2, "c", 2, [0, 0, 2, 1]),
    ]


# --- matching -----------------------------------------------------------------------------------
def test_greedy_match_known_answer():
    scores = np.array(
        [
            [0.9, 0.8, 0.0],  # phrase 0 wants segment 0
            [0.85, 0.7, 0.1],  # phrase 1 also wants segment 0 but loses it -> segment 1
            [0.2, 0.1, 0.05],  # phrase 2: its best left-over is below the threshold
        ]
    )
    assert greedy_match(scores, threshold=0.3) == [(0, 0, 0.9), (1, 1, 0.7)]
    assert greedy_match(scores, threshold=0.0) == [(0, 0, 0.9), (1, 1, 0.7), (2, 2, 0.05)]
    assert greedy_match(scores, threshold=0.95) == []
    assert greedy_match(np.zeros((0, 3)), 0.0) == []
    # greedy is not the optimal assignment: 0.9 + 0.1 beats 0.8 + 0.8 only greedily
    assert greedy_match(np.array([[0.9, 0.8], [0.8, 0.1]]), 0.0) == [(0, 0, 0.9), (1, 1, 0.1)]
    # ties go to the lower phrase, then the lower segment; NaN never matches
    assert greedy_match(np.array([[0.5, 0.5], [0.5, np.nan]]), 0.0) == [(0, 0, 0.5)]


def test_match_subjects_keeps_people_in_caption_order():
    phrases = [
        {"text": t, "start": s, "end": s + len(t)}
        for t, s in [("a man", 0), ("a dog", 10), ("a woman", 20), ("a kid", 30)]
    ]
    segments = [
        {"id": 1, "label": "person"},
        {"id": 2, "label": "dog"},
        {"id": 3, "label": "person"},
        {"id": 4, "label": "person"},
    ]
    scores = np.array([[0.2, 0, 0.6, 0], [0, 0.9, 0, 0], [0.7, 0, 0.1, 0], [0, 0, 0, 0.3]])
    subjects, error = match_subjects(scores, phrases, segments, threshold=0.1, max_subjects=4)
    assert error is None
    assert [(s["phrase"], s["start"], s["segment_id"]) for s in subjects] == [
        ("a man", 0, 3),
        ("a woman", 20, 1),
        ("a kid", 30, 4),
    ]
    subjects, _ = match_subjects(scores, phrases, segments, threshold=0.1, max_subjects=2)
    assert [s["segment_id"] for s in subjects] == [3, 1]  # the two best scores, in caption order
    assert match_subjects(scores, phrases, segments, threshold=0.95, max_subjects=4) == ([], "no_match")
    only_dog = np.array([[0, 0.9, 0, 0]] + [[0, 0, 0, 0]] * 3)
    assert match_subjects(only_dog, phrases, segments, threshold=0.1, max_subjects=4) == ([], "no_person")


def test_readable_label_and_crop():
    assert readable_label("sky-other-merged") == "sky"
    assert readable_label("dining table") == "dining table"
    image = Image.new("RGB", (4, 3), (255, 255, 255))
    id_map = np.array([[0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]], dtype=np.uint16)
    crop = np.asarray(segment_crop(image, id_map, {"id": 1, "bbox": [1, 0, 3, 2]}))
    assert crop.shape == (2, 2, 3)
    assert crop[0, 0].tolist() == [255, 255, 255] and crop[1, 1].tolist() == [122, 116, 104]


def test_tiny_clip_times_real_minilm(tiny_matcher):
    image = Image.new("RGB", (40, 30), "white")
    id_map = np.zeros((30, 40), np.uint16)
    id_map[:, :20], id_map[:, 20:] = 1, 2
    segments = [
        {"id": 1, "label": "person", "bbox": [0, 0, 20, 30]},
        {"id": 2, "label": "dog", "bbox": [20, 0, 40, 30]},
    ]
    phrases = ["a young man", "a small dog", "a red car"]
    scores = tiny_matcher.score(image, id_map, segments, phrases)
    assert scores.shape == (3, 2)
    crops = [segment_crop(image, id_map, s) for s in segments]
    clip = tiny_matcher.clip_similarity(crops, phrases)
    sbert = tiny_matcher.label_similarity(["person", "dog"], phrases)
    np.testing.assert_allclose(scores, ((1 + clip) / 2 * np.clip(sbert, 0, None)).T, rtol=1e-5)
    # the real MiniLM knows what a person and a dog are
    assert sbert[0, 0] > sbert[0, 2] and sbert[1, 1] > max(sbert[1, 0], sbert[1, 2])
    pairs = greedy_match(scores, tiny_matcher.default_threshold)
    assert (0, 0) in [(p, s) for p, s, _ in pairs] and (1, 1) in [(p, s) for p, s, _ in pairs]
    assert tiny_matcher.score(image, id_map, segments, []).shape == (0, 2)


@pytest.mark.parametrize("step", ["captioner", "segmenter"])
def test_paper_profile_without_weights_says_what_to_do(step):
    from fc_pipeline.data.captioning import Captioner
    from fc_pipeline.data.segmentation import Segmenter
    from fc_pipeline.profiles import get_profile

    cls = {"captioner": Captioner, "segmenter": Segmenter}[step]
    with pytest.raises(OSError, match=rf"'/nonexistent/{step}'.*get_profile\('paper', {step}="):
        cls(get_profile("paper", **{step: f"/nonexistent/{step}"}))
