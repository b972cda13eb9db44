"""Step 5: webdataset shards of the finished samples (DESIGN §4), and reading them back.

Layout under ``out_dir``: ``train/00000.tar``, ``val/00000.tar``, … with per sample ``<id>.jpg``
(RGB, EXIF-transposed), ``<id>.json`` and ``<id>.seg.png`` (16-bit segment ids, 0 = none); beside
each shard a parquet of its rows; ``<split>/_stats.json``; and ``failures.parquet``, the ledger
of every image that is not in a shard, with the step and reason.

The split is stable per image id: ids are ranked by a hash and the first
``min(val_max, round(val_fraction · n))`` go to ``val`` — at least one when there are ≥ 2
samples and ``val_fraction > 0`` (so a small corpus still validates). Shards are written under a
temp name and renamed. A shard whose parquet records the same plan (sample ids and their
metadata) is complete and skipped on a re-run; stale shards beyond the plan are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from fc_pipeline.data import batches
from fc_pipeline.data.segmentation import read_id_map
from fc_pipeline.images import ImageError, load_image
from fc_pipeline.storage import TEMP_SUFFIX, atomic_write, write_json, write_parquet

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
JPEG_QUALITY = 95
PLAN_KEY = b"fc_pipeline.shard_plan"
FAILURES_KEY = b"fc_pipeline.shard_failures"
CAPTION_REASONS = ("empty_caption", "caption_failed")

SIDECAR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("raw_caption", pa.string()),
        ("n_subjects", pa.int32()),
        ("subjects", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
FAILURES_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("step", pa.string()), ("reason", pa.string())])


def write_shards(
    corpus: pa.Table,
    phrases: pa.Table,
    segments: pa.Table,
    matches: pa.Table,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.05,
    val_max: int = 1000,
    models: dict | None = None,
) -> dict:
    """Write the train/val shards of every image without error; return the stats.

    Stats: ``images``, ``samples``, per split ``{samples, shards, subjects_histogram}``,
    ``subjects_histogram``, ``failures`` (reason -> count), ``written``/``skipped`` shard
    paths of this run, and ``paths`` (out_dir, failures ledger, shard lists).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    records, ledger = _join(corpus, phrases, segments, matches, models or {})
    splits = split_ids(sorted(records), val_fraction, val_max)
    written, skipped = [], []
    per_split = {}
    for split, ids in splits.items():
        split_dir = out_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(split_dir, n_shards=-(-len(ids) // samples_per_shard))
        histogram: Counter = Counter()
        shard_names = []
        for index, shard_ids in enumerate(batches(ids, samples_per_shard)):
            shard = split_dir / f"{index:05d}.tar"
            shard_names.append(shard.name)
            plan = _plan_digest([records[i] for i in shard_ids])
            failures = _completed_shard_failures(shard, plan)
            if failures is None:
                failures = _write_shard(shard, [records[i] for i in shard_ids], plan)
                written.append(str(shard))
            else:
                skipped.append(str(shard))
            ledger.extend(failures)
            failed = {f["id"] for f in failures}
            histogram.update(records[i]["meta"]["n_subjects"] for i in shard_ids if i not in failed)
        per_split[split] = {
            "samples": sum(histogram.values()),
            "shards": shard_names,
            "subjects_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        }
    failure_counts = dict(sorted(Counter(f["reason"] for f in ledger).items()))
    ledger_path = write_parquet(pa.Table.from_pylist(ledger, schema=FAILURES_SCHEMA), out_dir / "failures.parquet")
    for split, stats in per_split.items():
        write_json({"split": split, **stats, "failures": failure_counts}, out_dir / split / "_stats.json")
    total_histogram = Counter()
    for stats in per_split.values():
        total_histogram.update({int(k): v for k, v in stats["subjects_histogram"].items()})
    return {
        "images": corpus.num_rows,
        "samples": sum(stats["samples"] for stats in per_split.values()),
        "splits": per_split,
        "subjects_histogram": {str(k): total_histogram[k] for k in sorted(total_histogram)},
        "failures": failure_counts,
        "written": written,
        "skipped": skipped,
        "paths": {
            "out_dir": str(out_dir),
            "failures": str(ledger_path),
            **{split: shard_urls(out_dir, split) for split in SPLITS},
        },
    }


def split_ids(ids: list[str], val_fraction: float = 0.05, val_max: int = 1000) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}``, each sorted; see the module docstring for the rule."""
    n = len(ids)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(val_max, max(1, round(val_fraction * n)), n - 1)
    ranked = sorted(ids, key=lambda image_id: hashlib.sha256(f"split:{image_id}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return {"train": sorted(i for i in ids if i not in val), "val": sorted(val)}


def shard_urls(out_dir: str | Path, split: str = "train") -> list[str]:
    """The shard files of a split, sorted (a local folder or any fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    found = sorted(fs.glob(f"{root.rstrip('/')}/{split}/[0-9]*.tar"))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return found if "file" in protocols else [fs.unstrip_protocol(path) for path in found]


def read_samples(url_or_dir: str | Path | list[str], split: str = "train") -> Iterator[dict]:
    """Samples ``{"id", "image" (PIL RGB), "meta" (the json), "seg" (uint16 HxW)}`` via webdataset.

    ``url_or_dir`` is a dataset folder/URL (its ``split`` shards are read), a shard URL or
    brace pattern, or a list of shard URLs.
    """
    import webdataset as wds

    if isinstance(url_or_dir, (list, tuple)):
        urls = list(url_or_dir)
    elif str(url_or_dir).endswith(".tar") or "{" in str(url_or_dir):
        urls = str(url_or_dir)
    else:
        urls = shard_urls(url_or_dir, split)
        if not urls:
            return
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield {
            "id": sample["__key__"],
            "image": load_image(sample["jpg"]),
            "meta": json.loads(sample["json"]),
            "seg": read_id_map(sample["seg.png"]),
        }


def _join(corpus: pa.Table, phrases: pa.Table, segments: pa.Table, matches: pa.Table, models: dict):
    """Per sample the metadata to write; the ledger of the images that failed a step."""
    tables = {"phrases": phrases, "segments": segments, "matches": matches}
    by_id = {name: {row["id"]: row for row in table.to_pylist()} for name, table in tables.items()}
    records, ledger = {}, []
    for row in corpus.to_pylist():
        steps = {name: rows.get(row["id"]) for name, rows in by_id.items()}
        missing = [name for name, step_row in steps.items() if step_row is None]
        if missing:
            raise ValueError(f"image {row['id']} is missing from the {', '.join(missing)} table(s); re-run those steps")
        phr, seg, match = steps["phrases"], steps["segments"], steps["matches"]
        step, reason = _first_failure(row, phr, seg, match)
        if reason is not None:
            ledger.append({"id": row["id"], "path": row["path"], "step": step, "reason": reason})
            continue
        subjects = json.loads(match["subjects"])
        meta = {
            "caption": phr["caption"],
            "raw_caption": phr["raw_caption"],
            "subjects": subjects,
            "segments": json.loads(seg["segments"]),
            "source": {"path": row["path"], "sha256": row["sha256"], "width": row["width"], "height": row["height"]},
            "models": models,
        }
        records[row["id"]] = {"id": row["id"], "seg_path": seg["seg_path"], "meta": {**meta, "n_subjects": len(subjects)}}
    return records, ledger


def _first_failure(row: dict, phr: dict, seg: dict, match: dict) -> tuple[str | None, str | None]:
    """The first step of the chain that failed the image, and its reason."""
    if row["error"]:
        return "scan", row["error"]
    if phr["error"] in CAPTION_REASONS:
        return "caption", phr["error"]
    if seg["error"]:
        return "segment", seg["error"]
    if phr["error"]:
        return "phrases", phr["error"]
    if match["error"] or not match["n_subjects"]:
        return "match", match["error"] or "no_person"
    return None, None


def _plan_digest(records: list[dict]) -> str:
    payload = json.dumps([(r["id"], r["meta"]) for r in records], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _completed_shard_failures(shard: Path, plan: str) -> list[dict] | None:
    """The shard-time failures of a complete shard with this plan; ``None`` if it must be (re)written."""
    sidecar = shard.with_suffix(".parquet")
    if not (shard.is_file() and sidecar.is_file()):
        return None
    try:
        metadata = pq.read_schema(sidecar).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    if metadata.get(PLAN_KEY) != plan.encode():
        return None
    return json.loads(metadata.get(FAILURES_KEY, b"[]"))


def _write_shard(shard: Path, records: list[dict], plan: str) -> list[dict]:
    """Write one tar (temp + rename), then its parquet sidecar; return the samples that failed."""
    import webdataset as wds

    rows, failures = [], []
    with atomic_write(shard) as handle:
        # mtime fixed so that the same samples always give the same bytes
        writer = wds.TarWriter(handle, mtime=0.0)
        for record in tqdm(records, desc=shard.name, disable=len(records) < 100):
            try:
                sample = _encode_sample(record)
            except (ImageError, OSError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, ImageError) else "shard_failed"
                logger.warning("sample %s left out of %s: %s", record["id"], shard.name, exc)
                failures.append({"id": record["id"], "path": record["meta"]["source"]["path"], "step": "shard", "reason": reason})
                continue
            writer.write(sample)
            meta = record["meta"]
            rows.append(
                {
                    "id": record["id"],
                    "caption": meta["caption"],
                    "raw_caption": meta["raw_caption"],
                    "n_subjects": meta["n_subjects"],
                    "subjects": json.dumps(meta["subjects"]),
                    "path": meta["source"]["path"],
                    "width": meta["source"]["width"],
                    "height": meta["source"]["height"],
                }
            )
        writer.close()
    sidecar = pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA).replace_schema_metadata(
        {PLAN_KEY: plan.encode(), FAILURES_KEY: json.dumps(failures).encode()}
    )
    write_parquet(sidecar, shard.with_suffix(".parquet"))
    return failures


def _encode_sample(record: dict) -> dict:
    meta = {k: v for k, v in record["meta"].items() if k != "n_subjects"}
    image = load_image(meta["source"]["path"])
    id_map = read_id_map(record["seg_path"])
    if id_map.shape != (image.height, image.width):
        raise ValueError(f"segment map {id_map.shape} does not fit image {image.size}")
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=JPEG_QUALITY)
    return {
        "__key__": record["id"],
        "jpg": jpeg.getvalue(),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "seg.png": Path(record["seg_path"]).read_bytes(),
    }


def _remove_leftovers(split_dir: Path, n_shards: int) -> None:
    """Delete temp files of a killed run and shards beyond the current plan."""
    for path in split_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
            path.unlink()
        elif path.suffix in (".tar", ".parquet") and path.stem.isdigit() and int(path.stem) >= n_shards:
            path.unlink()
