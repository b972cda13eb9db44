"""The drawn demo corpus: deterministic, offline, and it exercises every branch of the chain."""

import hashlib

import numpy as np
import pytest

from fc_pipeline.data.corpus import scan_corpus
from fc_pipeline.data.demo_corpus import CORRUPT_NAME, SCENES, demo_scenes, draw_scene, make_demo_corpus
from fc_pipeline.data.segmentation import load_annotation
from fc_pipeline.images import ImageError, load_image


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_default_corpus_is_deterministic_and_complete(tmp_path):
    first = make_demo_corpus(tmp_path / "a")
    second = make_demo_corpus(tmp_path / "b")
    assert _digests(first) == _digests(second)

    corpus = scan_corpus(first)
    assert corpus.num_rows == 24
    assert corpus.column("error").to_pylist().count("truncated") == 1
    assert corpus.num_rows - corpus.column("caption").null_count == sum(s.caption is not None for s in SCENES) == 16
    assert corpus.num_rows - corpus.column("annotation").null_count == sum(s.annotated for s in SCENES) == 12
    assert {p.suffix for p in first.iterdir()} >= {".jpg", ".png", ".webp", ".txt", ".json"}
    captions = set(corpus.column("caption").to_pylist())
    assert "two women standing on the grass" in captions  # a numbered plural with two subjects


def test_annotations_hold_one_person_segment_per_figure(tmp_path):
    folder = make_demo_corpus(tmp_path, n=6)
    for scene in demo_scenes(6):
        if not scene.annotated:
            assert not (folder / f"{scene.name}.panoptic.json").exists()
            continue
        image = load_image(folder / f"{scene.name}.{scene.fmt}")
        id_map, segments = load_annotation(folder / f"{scene.name}.panoptic.json", image.size)
        people = [s for s in segments if s["label"] == "person"]
        assert len(people) == scene.people
        assert all(s["isthing"] for s in people)
        for segment in segments:
            assert (id_map == segment["id"]).sum() == segment["area"] > 0


def test_corrupt_file_is_truncated_and_small_corpus_mixes_kinds(tmp_path):
    folder = make_demo_corpus(tmp_path, n=6)
    with pytest.raises(ImageError) as error:
        load_image(folder / CORRUPT_NAME)
    assert error.value.reason == "truncated"
    scenes = demo_scenes(6)
    assert len(scenes) == 5
    assert sum(s.annotated for s in scenes) == 3
    assert sum(s.caption is not None and not s.annotated for s in scenes) == 1
    assert sum(s.caption is None for s in scenes) == 1


def test_rerun_leaves_a_complete_corpus_untouched(tmp_path):
    folder = make_demo_corpus(tmp_path, n=4)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    make_demo_corpus(tmp_path, n=4)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_scenes_past_the_script_get_numbered_names_and_bad_sizes_fail():
    names = [s.name for s in demo_scenes(len(SCENES) + 3)]
    assert len(set(names)) == len(names)
    assert names[len(SCENES)] == f"{SCENES[0].name}_1"
    with pytest.raises(ValueError, match="n >= 2"):
        demo_scenes(1)


def test_drawn_id_map_matches_segments_info():
    image, ids, segments = draw_scene(SCENES[1], seed=1)
    assert ids.shape == (image.height, image.width) and ids.dtype == np.uint16
    assert sorted(s["id"] for s in segments) == sorted(int(i) for i in np.unique(ids) if i)
    assert [s["label"] for s in segments].count("person") == 2
