"""Step 5: webdataset shards of the finished samples (format: docs/architecture.md), and reading them back.

Layout under ``out_dir``: ``train/00000.tar``, ``val/00000.tar``, … with per sample ``<id>.jpg``
(RGB, EXIF-transposed), ``<id>.json`` and ``<id>.seg.png`` (16-bit segment ids, 0 = none); beside
each shard its sidecar, a parquet of its rows (with the samples that failed while packing it in
its metadata); ``<split>/_stats.json``; ``failures.parquet``, the ledger of every image of the
corpus that is not in a shard, with the step and reason; and ``_dataset.json``, the settings that
shape the samples (``models``, ``val_fraction``, ``val_max``).

Append-only, so that a growing corpus costs only its new images: a shard is complete when its tar
and its sidecar exist, and is never rewritten. A re-run writes the samples whose id is in no
sidecar into new shards numbered after the last one of their split. Only a change of the settings
in ``_dataset.json`` (or ``rebuild=True``) rewrites every shard. The tar, then its sidecar, is
written under a temp name and renamed: a killed run leaves at most a tar without a sidecar, which
the next run removes and writes again. A writer holds the folder's lock
(:func:`fc_pipeline.locks.writer_lock`) from start to end: a second one is refused, so no sample is
ever written twice, and only the holder removes temp files. A sample in a shard keeps what it was
written with: one the corpus has changed since (an edited caption) counts as ``stale`` until a
rebuild, one whose image left the corpus stays in its shard (``orphaned``).

The split is per image id, so a sample never changes split as the corpus grows:
``u(id) = int(sha256("split:" + id)[:16], 16) / 2**64``, and a new sample goes to ``val`` iff
``u < val_fraction`` while val stays within ``val_max`` (new samples taken by increasing ``u``).
If the dataset would then have no val sample while it has ≥ 2 samples and ``val_fraction > 0``,
the new sample with the smallest ``u`` goes to val (so a small corpus still validates). Val is
thus about ``val_fraction`` of the corpus, at most ``val_max`` (the paper held out 1000 images: min(1000, 5 %)), and
independent of the order images arrive in until ``val_max`` is reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from fc_pipeline.data import batches
from fc_pipeline.data.segmentation import read_id_map
from fc_pipeline.images import ImageError, load_image
from fc_pipeline.locks import WriterLockHeld, remove_temp_files, writer_lock
from fc_pipeline.storage import atomic_write, write_json, write_parquet

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
JPEG_QUALITY = 95
DATASET_RECORD = "_dataset.json"
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
        ("meta_sha256", pa.string()),  # of the sample's json: tells when the corpus has changed it
    ]
)
FAILURES_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("step", pa.string()), ("reason", pa.string())]
)


class ShardIndex(NamedTuple):
    """What a complete shard holds, from its sidecar: its samples and the images it left out."""

    ids: list[str]
    n_subjects: list[int]
    digests: list[str]
    failures: list[dict]


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
    rebuild: bool = False,
) -> dict:
    """Append new shards for the images without error that are in no shard yet; return the stats.

    Stats, totals over every shard of the dataset: ``images`` (of this corpus), ``samples``, per
    split ``{samples, shards, subjects_histogram}``, ``subjects_histogram``, ``failures`` (reason ->
    count, from the ledger). Of this call: ``mode`` (``rebuilt``, ``appended`` or ``unchanged``),
    ``appended`` (samples written), ``written``/``skipped`` (shard paths written / kept),
    ``stale`` (samples in a shard whose metadata the corpus has changed since: ``rebuild`` to
    refresh them) and ``orphaned`` (samples in a shard whose image left the corpus). ``paths``:
    out_dir, the failures ledger, the shards of each split. Raises
    :class:`~fc_pipeline.locks.WriterLockHeld` while another writer holds ``out_dir``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_max < 0:
        raise ValueError(f"val_max must be >= 0, got {val_max}")
    out_dir = Path(out_dir)
    records, ledger = _join(corpus, phrases, segments, matches, models or {})
    with writer_lock(out_dir, what="shard writer"):
        remove_temp_files(out_dir)
        return _update_shards(
            corpus, records, ledger, out_dir, samples_per_shard, val_fraction, val_max, models or {}, rebuild
        )


def _update_shards(
    corpus: pa.Table,
    records: dict,
    ledger: list[dict],
    out_dir: Path,
    samples_per_shard: int,
    val_fraction: float,
    val_max: int,
    models: dict,
    rebuild: bool,
) -> dict:
    """The body of :func:`write_shards`, run holding the dataset folder's lock."""
    settings = json.loads(json.dumps({"models": models, "val_fraction": val_fraction, "val_max": val_max}))
    reason = "rebuild requested" if rebuild else _settings_change(out_dir, settings)
    if reason:
        logger.warning("rewriting every shard of %s: %s", out_dir, reason)
        for path in _shard_files(out_dir):
            path.unlink()
    if reason or not (out_dir / DATASET_RECORD).is_file():
        write_json(settings, out_dir / DATASET_RECORD)

    shards = {split: _complete_shards(out_dir / split) for split in SPLITS}
    indexes = [index for split in shards.values() for index in split.values()]
    sharded = {i: digest for index in indexes for i, digest in zip(index.ids, index.digests)}
    shard_failures = {f["id"]: f for index in indexes for f in index.failures}
    # every image of the corpus is a sample of some shard, or once in the ledger
    ledger = [f for f in ledger if f["id"] not in sharded]
    ledger += [f for i, f in shard_failures.items() if i in records and i not in sharded]
    in_corpus = set(corpus.column("id").to_pylist())
    # an image of the corpus that is not in ``records`` now fails a step
    stale = sum(
        i in in_corpus and (i not in records or records[i]["digest"] != digest) for i, digest in sharded.items()
    )
    orphaned = sum(i not in in_corpus for i in sharded)
    if stale:
        logger.warning(
            "%d sample(s) in the shards of %s no longer match the corpus (e.g. an edited caption) and keep "
            "their old metadata; write the shards with rebuild=True to refresh them",
            stale,
            out_dir,
        )

    new_ids = sorted(i for i in records if i not in sharded and i not in shard_failures)
    existing = {split: sum(len(index.ids) for index in split_shards.values()) for split, split_shards in shards.items()}
    skipped = [str(out_dir / split / name) for split in SPLITS for name in sorted(shards[split])]
    written, appended = [], 0
    for split, ids in split_ids(new_ids, val_fraction, val_max, existing=existing).items():
        first = max((int(Path(name).stem) + 1 for name in shards[split]), default=0)
        for number, shard_ids in enumerate(batches(ids, samples_per_shard), start=first):
            shard = out_dir / split / f"{number:05d}.tar"
            index = shards[split][shard.name] = _write_shard(shard, [records[i] for i in shard_ids])
            written.append(str(shard))
            appended += len(index.ids)
            ledger += index.failures

    per_split = {split: _split_stats(split_shards) for split, split_shards in shards.items()}
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
        "mode": "rebuilt" if reason else "appended" if written else "unchanged",
        "appended": appended,
        "stale": stale,
        "orphaned": orphaned,
        "written": written,
        "skipped": skipped,
        "paths": {
            "out_dir": str(out_dir),
            "failures": str(ledger_path),
            **{split: shard_urls(out_dir, split) for split in SPLITS},
        },
    }


def split_position(image_id: str) -> float:
    """``u(id)`` in [0, 1), where an image falls in the train/val split (module docstring)."""
    return int(hashlib.sha256(f"split:{image_id}".encode()).hexdigest()[:16], 16) / 2**64


def split_ids(
    ids: list[str], val_fraction: float = 0.05, val_max: int = 1000, existing: dict[str, int] | None = None
) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}`` of new ids, each sorted, by the rule of the module
    docstring; ``existing``: the samples already in each split's shards."""
    existing = existing or {}
    ranked = sorted(ids, key=lambda image_id: (split_position(image_id), image_id))
    room = max(0, val_max - existing.get("val", 0))
    val = [image_id for image_id in ranked if split_position(image_id) < val_fraction][:room]
    total = len(ranked) + sum(existing.values())
    if not val and not existing.get("val") and ranked and total >= 2 and val_fraction > 0 and val_max > 0:
        val = ranked[:1]
    chosen = set(val)
    return {"train": sorted(i for i in ids if i not in chosen), "val": sorted(chosen)}


def shard_urls(out_dir: str | Path, split: str = "train") -> list[str]:
    """The shard files of a split, sorted (a local folder or any fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    found = sorted(fs.glob(f"{root.rstrip('/')}/{split}/[0-9]*.tar"))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return found if "file" in protocols else [fs.unstrip_protocol(path) for path in found]


def read_raw_samples(url_or_dir: str | Path | list[str], split: str = "train") -> Iterator[dict]:
    """The tar members of each sample, undecoded: ``{"__key__", "jpg", "json", "seg.png"}`` (bytes).

    ``url_or_dir`` is a dataset folder/URL (its ``split`` shards are read), a shard URL or
    brace pattern, or a list of shard URLs. Reading raw members is cheap; :func:`decode_sample`
    is the expensive part, so a reader that only needs some samples decodes only those.
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
    # No node/worker splitting here: the training loader (TrainingSamples) decides which stream
    # owns which shard or sample.
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


def decode_sample(raw: dict) -> dict:
    """``{"id", "image" (PIL RGB), "meta" (the json), "seg" (uint16 HxW)}`` of a raw sample."""
    return {
        "id": raw["__key__"],
        "image": load_image(raw["jpg"]),
        "meta": json.loads(raw["json"]),
        "seg": read_id_map(raw["seg.png"]),
    }


def read_samples(url_or_dir: str | Path | list[str], split: str = "train") -> Iterator[dict]:
    """Decoded samples (see :func:`decode_sample`) of a dataset folder, shard URL(s) or pattern."""
    for raw in read_raw_samples(url_or_dir, split):
        yield decode_sample(raw)


VERIFIED_RECORD = "_verified.json"  # shards already read back by verify_shards: {split/name: [size, mtime_ns, n]}


def _verify_shard(tar: Path, sidecar_ids: list[str]) -> tuple[int, list[str]]:
    """(samples read, problems) of one shard: every sample decodes, has a caption and a segment
    map of its image's size, and the tar holds exactly the ids of its parquet sidecar."""
    ids, problems = [], []
    try:
        for sample in read_samples(str(tar)):
            ids.append(sample["id"])
            if not sample["meta"].get("caption"):
                problems.append(f"{sample['id']}: empty caption")
            if sample["seg"].shape != (sample["image"].height, sample["image"].width):
                problems.append(f"{sample['id']}: segment map does not fit the image")
    except Exception as exc:  # any decoding error means an unreadable shard
        problems.append(f"{tar.parent.name}/{tar.name}: {type(exc).__name__}: {exc}")
    if not problems and ids != sidecar_ids:
        problems.append(f"{tar.parent.name}/{tar.name}: its samples differ from its sidecar's ids")
    return len(ids), problems


def verify_shards(shards_dir: str | Path) -> dict:
    """Read back the shards of a dataset folder that were not verified before, and check them all.

    A shard is decoded only when its (size, modification time) is not in ``_verified.json`` (complete
    shards are immutable, so a verified one stays verified); a clean one is then recorded there. Over
    all shards, from the parquet sidecars (no decode): no sample id is in two shards, and each split
    holds as many samples as its ``_stats.json`` says. Returns ``{"counts": {split: n}, "problems":
    [...], "decoded_shards": n, "reused_shards": n}``.
    """
    shards_dir = Path(shards_dir)
    record_path = shards_dir / VERIFIED_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    verified, counts, problems, seen = {}, {}, [], {}
    decoded = reused = 0
    for split in SPLITS:
        stats_path = shards_dir / split / "_stats.json"
        if not stats_path.exists():
            problems.append(f"{split}: no _stats.json")
            continue
        counts[split] = 0
        for tar in sorted((shards_dir / split).glob("[0-9]*.tar")):
            name, stat = f"{split}/{tar.name}", tar.stat()
            sidecar = tar.with_suffix(".parquet")
            ids = pq.read_table(sidecar, columns=["id"]).column("id").to_pylist() if sidecar.exists() else []
            for sample_id in ids:
                if sample_id in seen:
                    problems.append(f"{sample_id}: in more than one shard ({seen[sample_id]} and {name})")
                seen.setdefault(sample_id, name)
            known = record.get(name)
            if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
                counts[split] += known[2]
                verified[name], reused = known, reused + 1
                continue
            read, shard_problems = _verify_shard(tar, ids)
            counts[split] += read
            decoded += 1
            if not shard_problems:
                verified[name] = [stat.st_size, stat.st_mtime_ns, read]
            problems += shard_problems
        expected = json.loads(stats_path.read_text())["samples"]
        if counts[split] != expected:
            problems.append(f"{split}: {counts[split]} samples read, {expected} expected")
    if verified != record:  # a cache: skipped while a writer holds the folder (only a lock holder writes there)
        with contextlib.suppress(WriterLockHeld), writer_lock(shards_dir, what="shard writer"):
            write_json(verified, record_path)
    return {"counts": counts, "problems": problems, "decoded_shards": decoded, "reused_shards": reused}


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
        meta["n_subjects"] = len(subjects)
        records[row["id"]] = {"id": row["id"], "seg_path": seg["seg_path"], "meta": meta, "digest": _digest(meta)}
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


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _shard_files(out_dir: Path) -> list[Path]:
    """The shards and sidecars of every split (complete or not)."""
    return [
        path
        for split in SPLITS
        for path in sorted((out_dir / split).glob("[0-9]*.*"))
        if path.suffix in (".tar", ".parquet")
    ]


def _settings_change(out_dir: Path, settings: dict) -> str | None:
    """Why the shards in ``out_dir`` do not fit ``settings``; ``None`` when they do (or there are none)."""
    record = out_dir / DATASET_RECORD
    if record.is_file():
        recorded = json.loads(record.read_text())
        changed = sorted(key for key in settings.keys() | recorded.keys() if recorded.get(key) != settings.get(key))
        return f"{', '.join(changed)} changed since they were written" if changed else None
    if _shard_files(out_dir):
        return f"they have no {DATASET_RECORD} (written by an earlier version)"
    return None


def _complete_shards(split_dir: Path) -> dict[str, ShardIndex]:
    """The complete shards of a split by name; removes temp files, tars without a readable
    sidecar (a killed run: their samples are written again) and sidecars without a tar.
    Only the holder of the dataset folder's lock may call it."""
    split_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(split_dir)
    complete = {}
    for shard in sorted(path for path in split_dir.glob("[0-9]*.tar") if path.stem.isdigit()):
        index = _read_sidecar(shard.with_suffix(".parquet"))
        if index is None:
            logger.warning("%s has no complete sidecar: removed, its samples are written again", shard)
            shard.unlink()
        else:
            complete[shard.name] = index
    for sidecar in split_dir.glob("[0-9]*.parquet"):
        if sidecar.with_suffix(".tar").name not in complete:
            sidecar.unlink()
    return complete


def _read_sidecar(sidecar: Path) -> ShardIndex | None:
    if not sidecar.is_file():
        return None
    try:
        table = pq.read_table(sidecar, columns=["id", "n_subjects", "meta_sha256"])
    except (OSError, pa.ArrowInvalid):
        return None
    failures = json.loads((table.schema.metadata or {}).get(FAILURES_KEY, b"[]"))
    ids, n_subjects, digests = (table.column(name).to_pylist() for name in ("id", "n_subjects", "meta_sha256"))
    return ShardIndex(ids, n_subjects, digests, failures)


def _split_stats(shards: dict[str, ShardIndex]) -> dict:
    """``{samples, shards, subjects_histogram}`` of a split's complete shards."""
    histogram = Counter(n for index in shards.values() for n in index.n_subjects)
    return {
        "samples": sum(histogram.values()),
        "shards": sorted(shards),
        "subjects_histogram": {str(k): histogram[k] for k in sorted(histogram)},
    }


@contextlib.contextmanager
def _tar_writer(handle) -> Iterator:
    """A webdataset ``TarWriter`` on ``handle`` (mtime fixed: the same samples give the same bytes),
    closed at the end. On an error (a full disk) its unwritten buffer is dropped: tarfile would
    otherwise write it into the closed temp file when collected (``write to closed file``)."""
    import webdataset as wds

    writer = wds.TarWriter(handle, mtime=0.0)
    try:
        yield writer
        writer.close()
    except BaseException:
        writer.tarstream.fileobj.closed = True
        raise


def _write_shard(shard: Path, records: list[dict]) -> ShardIndex:
    """Write one tar (temp + rename), then its sidecar; return what it holds."""
    rows, failures = [], []
    with atomic_write(shard) as handle, _tar_writer(handle) as writer:
        for record in tqdm(records, desc=shard.name, disable=len(records) < 100):
            try:
                sample = _encode_sample(record)
            except (ImageError, OSError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, ImageError) else "shard_failed"
                logger.warning("sample %s left out of %s: %s", record["id"], shard.name, exc)
                failures.append(
                    {"id": record["id"], "path": record["meta"]["source"]["path"], "step": "shard", "reason": reason}
                )
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
                    "meta_sha256": record["digest"],
                }
            )
    sidecar = pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA)
    write_parquet(
        sidecar.replace_schema_metadata({FAILURES_KEY: json.dumps(failures).encode()}), shard.with_suffix(".parquet")
    )
    return ShardIndex(
        [r["id"] for r in rows], [r["n_subjects"] for r in rows], [r["meta_sha256"] for r in rows], failures
    )


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
