"""Dataset checks on constructed good and bad data, and a failing blocking check stopping training."""

import json
import shutil

import dagster as dg
import pyarrow as pa

from assets import checks, dataset
from assets.checks import (
    evaluate_caption_rate,
    evaluate_failure_rate,
    evaluate_readable_rate,
    evaluate_shards_readable,
    evaluate_subject_rate,
)
from fc_pipeline.storage import write_parquet


def _captions(rows):
    return pa.Table.from_pylist(
        [{"id": str(i), "caption": c, "caption_source": "model", "error": e} for i, (c, e) in enumerate(rows)]
    )


def test_caption_rate_counts_readable_images_only():
    table = _captions(
        [("a man", None), ("a dog", None), ("a tree", None), (None, "empty_caption"), (None, "truncated")]
    )
    result = evaluate_caption_rate(table, min_rate=0.7)
    assert result.passed and result.metadata["non_empty_rate"].value == 0.75
    assert result.metadata["readable_images"].value == 4
    assert not evaluate_caption_rate(table, min_rate=0.9).passed
    assert not evaluate_caption_rate(_captions([]), min_rate=0.0).passed


def test_readable_rate_is_a_warning():
    corpus = pa.Table.from_pylist([{"id": "a", "error": None}, {"id": "b", "error": "truncated"}])
    result = evaluate_readable_rate(corpus, min_rate=0.8)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert result.metadata["unreadable_by_reason"].value == {"truncated": 1}
    assert evaluate_readable_rate(corpus, min_rate=0.5).passed


def test_failure_rate_separates_errors_from_filtered_images():
    corpus = pa.Table.from_pylist([{"id": str(i)} for i in range(10)])
    filtered = pa.Table.from_pylist([{"id": str(i), "reason": "no_person"} for i in range(5)])
    result = evaluate_failure_rate(corpus, filtered, max_error_rate=0.1, min_yield=0.5)
    assert result.passed
    assert (result.metadata["error_rate"].value, result.metadata["sample_yield"].value) == (0.0, 0.5)
    broken = pa.Table.from_pylist([{"id": str(i), "reason": "truncated"} for i in range(2)])
    assert not evaluate_failure_rate(corpus, broken, max_error_rate=0.1, min_yield=0.1).passed
    assert not evaluate_failure_rate(corpus, filtered, max_error_rate=0.1, min_yield=0.6).passed


def test_subject_rate_reads_the_shard_sidecars(tmp_path):
    write_parquet(
        pa.table({"id": ["a", "b", "c"], "n_subjects": pa.array([1, 0, 2], pa.int32())}),
        tmp_path / "train" / "00000.parquet",
    )
    result = evaluate_subject_rate(tmp_path, min_rate=0.6)
    assert result.passed and abs(result.metadata["with_subjects_rate"].value - 2 / 3) < 1e-9
    assert not evaluate_subject_rate(tmp_path, min_rate=0.9).passed
    assert not evaluate_subject_rate(tmp_path / "nothing", min_rate=0.0).passed


def test_shards_readable_on_good_truncated_and_miscounted_shards(chain, tmp_path):
    good = chain.path("shards")
    assert evaluate_shards_readable(good).passed

    truncated = shutil.copytree(good, tmp_path / "truncated")
    tar = truncated / "train" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    result = evaluate_shards_readable(truncated)
    assert not result.passed and result.metadata["problems"].value

    miscounted = shutil.copytree(good, tmp_path / "miscounted")
    stats = json.loads((miscounted / "val" / "_stats.json").read_text())
    (miscounted / "val" / "_stats.json").write_text(json.dumps({**stats, "samples": stats["samples"] + 1}))
    result = evaluate_shards_readable(miscounted)
    assert not result.passed
    assert any("expected" in problem for problem in result.metadata["problems"].value)


def test_shards_readable_decodes_only_shards_it_has_not_verified(chain, tmp_path, monkeypatch):
    from fc_pipeline.data import shards

    copy = shutil.copytree(chain.path("shards"), tmp_path / "copy")
    (copy / shards.VERIFIED_RECORD).unlink(missing_ok=True)
    decoded = []
    real = shards.decode_sample
    monkeypatch.setattr(shards, "decode_sample", lambda raw: decoded.append(raw["__key__"]) or real(raw))
    tars = sorted(copy.glob("*/[0-9]*.tar"))
    first = evaluate_shards_readable(copy)
    samples = sum(first.metadata["samples_read"].value.values())
    assert first.passed and first.metadata["shards_decoded"].value == len(tars) and len(decoded) == samples
    decoded.clear()
    again = evaluate_shards_readable(copy)
    assert again.passed and again.metadata["shards_decoded"].value == 0 and decoded == []
    assert again.metadata["shards_verified_before"].value == len(tars)
    assert again.metadata["samples_read"].value == first.metadata["samples_read"].value
    # a rewritten shard is read again; a duplicate id across shards is caught from the sidecars alone
    tar = copy / "val" / "00000.tar"
    shutil.copy(copy / "train" / "00000.tar", tar)
    shutil.copy(copy / "train" / "00000.parquet", tar.with_suffix(".parquet"))
    result = evaluate_shards_readable(copy)
    assert not result.passed and result.metadata["shards_decoded"].value == 1
    assert any("in more than one shard" in p for p in result.metadata["problems"].value)


def test_failing_blocking_check_stops_downstream_assets(chain):
    @dg.asset(deps=[dataset.training_shards])
    def downstream_of_shards() -> None:
        raise AssertionError("must not run after a failed blocking check")

    run_config = {"ops": {"training_shards_failure_rate": {"config": {"min_yield": 1.0}}}}
    result = chain.materialize([dataset.training_shards, checks.failure_rate, downstream_of_shards], run_config)
    assert not result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert not result.asset_materializations_for_node("downstream_of_shards")
