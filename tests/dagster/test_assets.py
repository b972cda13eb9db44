"""The dataset chain materialised in-process on a small demo corpus: metadata, files, caching."""

import json

from PIL import Image

from fc_pipeline.data.demo_corpus import demo_scenes
from fc_pipeline.storage import read_parquet

from .conftest import DATASET_ASSETS, DATASET_CHECKS, SMALL_CORPUS, metadata

SCENES = demo_scenes(SMALL_CORPUS)
ANNOTATED = [s for s in SCENES if s.annotated]
BARE = [s for s in SCENES if s.caption is None]


def test_corpus_and_caption_counts_match_the_corpus(chain):
    corpus = metadata(chain.result, "corpus_images")
    assert corpus["status"] == "computed" and corpus["corpus"] == "demo"
    assert corpus["new_images"] == SMALL_CORPUS and len(corpus["source_signature"]) == 16
    assert corpus["images"] == corpus["rows"] == SMALL_CORPUS
    assert corpus["readable"] == SMALL_CORPUS - 1
    assert corpus["failures_by_reason"] == {"truncated": 1}
    assert corpus["with_caption"] == len(SCENES) - len(BARE)
    assert corpus["with_annotation"] == len(ANNOTATED)
    assert corpus["preview"].startswith("![preview](data:image/png;base64,")
    assert Image.open(corpus["preview_path"]).height == 128

    captions = metadata(chain.result, "captions")
    assert (captions["computed"], captions["reused"]) == (SMALL_CORPUS, 0)
    assert captions["provided"] == len(SCENES) - len(BARE)
    assert captions["generated"] == len(BARE)  # the tiny BLIP-2 ran on the bare scenes only
    assert captions["failures_by_reason"] == {"truncated": 1}


def test_segments_phrases_and_matches(chain):
    segments = metadata(chain.result, "panoptic_segments")
    assert segments["provided"] == len(ANNOTATED)
    assert segments["predicted"] == len(SCENES) - len(ANNOTATED)
    assert segments["person_segments"] >= sum(s.people for s in ANNOTATED)
    table = read_parquet(chain.path("segments.parquet"))
    assert table.num_rows == SMALL_CORPUS
    for row in table.to_pylist():
        if row["seg_path"]:
            assert chain.path("segments") in __import__("pathlib").Path(row["seg_path"]).parents

    phrases = metadata(chain.result, "noun_phrases")
    plurals = [s for s in SCENES if s.caption and s.caption.split()[0] in ("two", "three", "4")]
    assert phrases["expanded_captions"] == len(plurals) == 2
    assert "**a woman** and **a woman** standing on **the grass**" in phrases["examples"]

    matches = metadata(chain.result, "subject_matches")
    assert matches["rows"] == SMALL_CORPUS
    assert 1 <= matches["images_with_subjects"] <= len(ANNOTATED)
    assert sum(int(k) * n for k, n in matches["subjects_per_image"].items()) == matches["subjects"]


def test_training_shards_and_their_summary(chain):
    shards = metadata(chain.result, "training_shards")
    assert shards["images_in"] == SMALL_CORPUS
    assert sum(shards["samples_out"].values()) == shards["rows"] >= 1
    assert shards["rows"] + shards["failed"] == SMALL_CORPUS
    assert shards["failures_by_reason"]["truncated"] == 1
    assert sum(shards["subjects_per_sample"].values()) == shards["rows"]
    out = shards["path"]
    assert (chain.path("shards")).samefile(out)
    assert (chain.path("shards") / "train" / "00000.tar").is_file()
    assert (
        json.loads((chain.path("shards") / "train" / "_stats.json").read_text())["samples"]
        == shards["samples_out"]["train"]
    )
    assert shards["models"]["profile"] == "tiny"
    (event,) = chain.result.asset_materializations_for_node("training_shards")
    assert len(event.tags["dagster/data_version"]) == 16


def test_all_dataset_checks_pass_on_the_demo(chain):
    evaluations = {e.check_name: e for e in chain.result.get_asset_check_evaluations()}
    assert set(evaluations) == {c.check_key.name for c in DATASET_CHECKS}
    assert all(e.passed for e in evaluations.values()), {n: e.metadata for n, e in evaluations.items() if not e.passed}


def test_rematerialising_unchanged_data_is_cached(chain):
    segments = chain.path("segments.parquet")
    before = segments.stat().st_mtime_ns
    result = chain.materialize(DATASET_ASSETS)
    assert result.success
    assert {a.key.to_user_string(): metadata(result, a.key.to_user_string())["status"] for a in DATASET_ASSETS} == {
        a.key.to_user_string(): "cached" for a in DATASET_ASSETS
    }
    assert segments.stat().st_mtime_ns == before


def test_changed_config_recomputes_only_that_step(chain):
    from .conftest import RUN_CONFIG

    run_config = {"ops": {**RUN_CONFIG["ops"], "subject_matches": {"config": {"max_subjects": 1}}}}
    result = chain.materialize(DATASET_ASSETS[:5], run_config)
    statuses = {a.key.to_user_string(): metadata(result, a.key.to_user_string())["status"] for a in DATASET_ASSETS[:5]}
    assert statuses.pop("subject_matches") == "computed"
    assert set(statuses.values()) == {"cached"}
    assert max(int(k) for k, n in metadata(result, "subject_matches")["subjects_per_image"].items() if n) <= 1
    # restore the default so later tests see the session's data
    assert chain.materialize(DATASET_ASSETS[4:5], {}).success
