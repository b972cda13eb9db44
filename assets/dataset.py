"""The dataset-construction chain (DESIGN §2) as Dagster assets, group ``dataset``.

corpus_images -> captions -> noun_phrases ─┐
             └-> panoptic_segments ────────┴-> subject_matches -> training_shards

Each asset is one call into :mod:`fc_pipeline.data`; its table is written as parquet under the
corpus's dataset dir (see :class:`~assets.resources.DatasetStore`) and downstream assets read it
from there, so nothing is pickled. A step whose inputs and settings are unchanged since its last
run reports ``status: cached`` and does no model work: the fingerprint of what produced a table
is stored in the parquet's schema metadata.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from fc_pipeline.data.demo import DEFAULT_SIZE as DEMO_SIZE
from fc_pipeline.data.demo import make_demo_corpus
from fc_pipeline.data.segmentation import read_id_map
from fc_pipeline.images import load_image
from fc_pipeline.models import get_profile
from fc_pipeline.storage import read_parquet, write_parquet

from .metadata import caption_examples, contact_sheet, failure_counts, markdown_table, overlay_segments, save_preview
from .resources import DEFAULT_CORPUS, CaptionerResource, DatasetStore, MatcherResource, SegmenterResource

GROUP = "dataset"
FINGERPRINT_KEY = b"fc_pipeline.inputs"
PREVIEW_IMAGES = 4

IMAGES = "images.parquet"
CAPTIONS = "captions.parquet"
SEGMENTS = "segments.parquet"
SEGMENT_MAPS = "segments"
PHRASES = "phrases.parquet"
MATCHES = "matches.parquet"
SHARDS = "shards"
PREVIEWS = "previews"


# --- configs ----------------------------------------------------------------------------------
class CorpusImagesConfig(dg.Config):
    source: str = Field(
        default="",
        description="Corpus folder or parquet/jsonl manifest. Empty: <data_root>/corpora/<corpus>; "
        "for the 'demo' corpus the demo images are drawn there first.",
    )
    demo_images: int = Field(default=DEMO_SIZE, description="Size of the drawn demo corpus.")


class CaptionsConfig(dg.Config):
    batch_size: int = Field(default=8, description="Images per captioner forward pass.")


class SegmentsConfig(dg.Config):
    batch_size: int = Field(default=4, description="Images per segmenter forward pass.")


class PhrasesConfig(dg.Config):
    profile: str = Field(default="tiny", description="Model profile naming the spaCy pipeline.")
    batch_size: int = Field(default=64, description="Captions per spaCy batch.")


class MatchesConfig(dg.Config):
    threshold: float | None = Field(
        default=None, description="Minimum CLIP×SBERT score of a phrase–segment pair; empty: the profile's default."
    )
    max_subjects: int = Field(default=4, description="At most this many subjects per image.")


class ShardsConfig(dg.Config):
    samples_per_shard: int = Field(default=1000, description="Samples per webdataset tar.")
    val_fraction: float = Field(default=0.05, description="Share of images held out for validation.")
    val_max: int = Field(default=1000, description="At most this many validation images.")


# --- step bookkeeping -------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def step_fingerprint(inputs: list[Path], settings: dict) -> str:
    """What a step's output depends on: its input files' bytes and its settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in inputs:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def run_step(output: Path, inputs: list[Path], settings: dict, compute: Callable[[], pa.Table]) -> tuple[pa.Table, str]:
    """Compute and write ``output`` unless it was produced from the same inputs and settings.

    Returns the table and ``"computed"`` or ``"cached"``.
    """
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise dg.Failure(f"upstream output missing: {missing}; materialise the upstream assets first")
    fingerprint = step_fingerprint(inputs, settings).encode()
    if output.exists() and (pq.read_schema(output).metadata or {}).get(FINGERPRINT_KEY) == fingerprint:
        return read_parquet(output), "cached"
    table = compute()
    write_parquet(table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint}), output)
    return table, "computed"


def _resource_settings(resource: dg.ConfigurableResource) -> dict:
    return {name: getattr(resource, name) for name in type(resource).model_fields}


def _result(
    context: dg.AssetExecutionContext, *, status: str, rows: int, failures: dict, path: Path, version: str, **metadata
) -> dg.MaterializeResult:
    context.log.info(f"{context.asset_key.to_user_string()}: {status}, {rows} rows, failures {failures or 'none'}")
    return dg.MaterializeResult(
        metadata={
            "status": status,
            "rows": rows,
            "failed": sum(failures.values()),
            "failures_by_reason": dg.MetadataValue.json(failures),
            "path": dg.MetadataValue.path(str(path)),
            **metadata,
        },
        data_version=dg.DataVersion(version[:16]),
    )


def _table_result(context: dg.AssetExecutionContext, table: pa.Table, output: Path, status: str, **metadata) -> dg.MaterializeResult:
    return _result(
        context, status=status, rows=table.num_rows, failures=failure_counts(table), path=output, version=file_digest(output), **metadata
    )


def _preview(store: DatasetStore, name: str, pictures: list[Image.Image]) -> dict:
    if not pictures:
        return {}
    path = store.path(PREVIEWS) / f"{name}.png"
    markdown = save_preview(contact_sheet(pictures), path)
    return {"preview": dg.MetadataValue.md(markdown), "preview_path": dg.MetadataValue.path(str(path))}


def _segment_overlays(corpus: pa.Table, segments: pa.Table, chosen: dict[str, list[int] | None]) -> list[Image.Image]:
    """Images of ``chosen`` ids (id -> segment ids to tint, or None for all) with masks overlaid."""
    paths = dict(zip(corpus.column("id").to_pylist(), corpus.column("path").to_pylist()))
    seg_paths = dict(zip(segments.column("id").to_pylist(), segments.column("seg_path").to_pylist()))
    return [
        overlay_segments(load_image(paths[image_id]), read_id_map(seg_paths[image_id]), ids)
        for image_id, ids in chosen.items()
    ]


# --- assets -----------------------------------------------------------------------------------
@dg.asset(group_name=GROUP, kinds={"parquet"})
def corpus_images(context: dg.AssetExecutionContext, config: CorpusImagesConfig, store: DatasetStore) -> dg.MaterializeResult:
    """Every image of the raw corpus, once (id = sha256 prefix of its bytes), with the caption and
    panoptic annotation the corpus provides and a reason code for files that cannot be read."""
    from fc_pipeline.data.corpus import scan_corpus

    source = Path(config.source) if config.source else store.source_dir
    if not config.source and store.corpus == DEFAULT_CORPUS:
        context.log.info(f"drawing the demo corpus ({config.demo_images} files) into {source}")
        make_demo_corpus(source, n=config.demo_images)
    output = store.path(IMAGES)
    context.log.info(f"scanning {source}")
    # Scanning re-reads every file anyway, so the fingerprint is the scan's own result.
    scanned = scan_corpus(source)
    table, status = run_step(output, [], {"scan": scanned.to_pylist()}, lambda: scanned)
    readable = table.filter(pc.is_null(table.column("error")))
    sample = [load_image(p) for p in readable.column("path").to_pylist()[:PREVIEW_IMAGES]]
    return _table_result(
        context,
        table,
        output,
        status,
        source=dg.MetadataValue.path(str(source)),
        images=table.num_rows,
        readable=readable.num_rows,
        with_caption=table.num_rows - table.column("caption").null_count,
        with_annotation=table.num_rows - table.column("annotation").null_count,
        **_preview(store, "corpus_images", sample),
    )


@dg.asset(group_name=GROUP, deps=[corpus_images], pool="gpu", kinds={"pytorch", "parquet"})
def captions(
    context: dg.AssetExecutionContext, config: CaptionsConfig, store: DatasetStore, captioner: CaptionerResource
) -> dg.MaterializeResult:
    """A caption per image: the one the corpus provides, else BLIP-2's (model built only if needed)."""
    from fc_pipeline.data.captioning import caption_corpus

    output = store.path(CAPTIONS)
    table, status = run_step(
        output,
        [store.path(IMAGES)],
        {"captioner": _resource_settings(captioner)},
        lambda: caption_corpus(read_parquet(store.path(IMAGES)), captioner.load, batch_size=config.batch_size),
    )
    sources = table.column("caption_source").to_pylist()
    rows = [r for r in table.to_pylist() if r["caption"]]
    examples = [r for r in rows if r["caption_source"] == "model"][:3] + [r for r in rows if r["caption_source"] == "provided"][:3]
    return _table_result(
        context,
        table,
        output,
        status,
        provided=sources.count("provided"),
        generated=sources.count("model"),
        examples=dg.MetadataValue.md(markdown_table(examples, ["id", "caption_source", "caption"])),
    )


@dg.asset(group_name=GROUP, deps=[corpus_images], pool="gpu", kinds={"pytorch", "parquet"})
def panoptic_segments(
    context: dg.AssetExecutionContext, config: SegmentsConfig, store: DatasetStore, segmenter: SegmenterResource
) -> dg.MaterializeResult:
    """Panoptic segments per image (Mask2Former, or the corpus's own annotation) and a 16-bit id map."""
    from fc_pipeline.data.segmentation import segment_corpus

    output = store.path(SEGMENTS)
    table, status = run_step(
        output,
        [store.path(IMAGES)],
        {"segmenter": _resource_settings(segmenter)},
        lambda: segment_corpus(
            read_parquet(store.path(IMAGES)), segmenter.load, store.path(SEGMENT_MAPS), batch_size=config.batch_size
        ),
    )
    per_image = {r["id"]: json.loads(r["segments"] or "[]") for r in table.to_pylist() if not r["error"]}
    labels = [s["label"] for segs in per_image.values() for s in segs]
    shown = {i: None for i, segs in per_image.items() if segs}
    sources = table.column("segment_source").to_pylist()
    return _table_result(
        context,
        table,
        output,
        status,
        segments=len(labels),
        person_segments=labels.count("person"),
        provided=sources.count("provided"),
        predicted=sources.count("model"),
        segment_maps=dg.MetadataValue.path(str(store.path(SEGMENT_MAPS))),
        **_preview(store, "panoptic_segments", _segment_overlays(read_parquet(store.path(IMAGES)), table, dict(list(shown.items())[:PREVIEW_IMAGES]))),
    )


@dg.asset(group_name=GROUP, deps=[captions], kinds={"spacy", "parquet"})
def noun_phrases(context: dg.AssetExecutionContext, config: PhrasesConfig, store: DatasetStore) -> dg.MaterializeResult:
    """Noun phrases of each caption (spaCy), numbered plurals expanded: "two women" -> "a woman and a woman"."""
    from fc_pipeline.data.phrases import phrase_corpus

    output = store.path(PHRASES)
    spacy_model = get_profile(config.profile).spacy
    table, status = run_step(
        output,
        [store.path(CAPTIONS)],
        {"spacy": spacy_model},
        lambda: phrase_corpus(read_parquet(store.path(CAPTIONS)), spacy_model=spacy_model, batch_size=config.batch_size),
    )
    rows = [r for r in table.to_pylist() if not r["error"]]
    return _table_result(
        context,
        table,
        output,
        status,
        phrases=sum(len(json.loads(r["phrases"] or "[]")) for r in rows),
        expanded_captions=sum(r["caption"] != r["raw_caption"] for r in rows),
        examples=dg.MetadataValue.md(caption_examples(table)),
    )


@dg.asset(group_name=GROUP, deps=[corpus_images, panoptic_segments, noun_phrases], pool="gpu", kinds={"pytorch", "parquet"})
def subject_matches(
    context: dg.AssetExecutionContext, config: MatchesConfig, store: DatasetStore, matcher: MatcherResource
) -> dg.MaterializeResult:
    """Subjects per image: noun phrases matched one-to-one to ``person`` segments (CLIP × SBERT score)."""
    from fc_pipeline.data.matching import match_corpus

    inputs = [store.path(IMAGES), store.path(SEGMENTS), store.path(PHRASES)]
    output = store.path(MATCHES)
    table, status = run_step(
        output,
        inputs,
        {"matcher": _resource_settings(matcher), "threshold": config.threshold, "max_subjects": config.max_subjects},
        lambda: match_corpus(
            *(read_parquet(p) for p in inputs), matcher.load, threshold=config.threshold, max_subjects=config.max_subjects
        ),
    )
    subjects = {r["id"]: json.loads(r["subjects"] or "[]") for r in table.to_pylist() if not r["error"]}
    histogram = np.bincount([len(s) for s in subjects.values()], minlength=config.max_subjects + 1).tolist()
    shown = {i: [s["segment_id"] for s in subs] for i, subs in subjects.items() if subs}
    return _table_result(
        context,
        table,
        output,
        status,
        subjects=sum(histogram[k] * k for k in range(len(histogram))),
        images_with_subjects=len(shown),
        subjects_per_image=dg.MetadataValue.json({str(k): n for k, n in enumerate(histogram)}),
        **_preview(
            store,
            "subject_matches",
            _segment_overlays(read_parquet(store.path(IMAGES)), read_parquet(store.path(SEGMENTS)), dict(list(shown.items())[:PREVIEW_IMAGES])),
        ),
    )


@dg.asset(group_name=GROUP, deps=[corpus_images, noun_phrases, panoptic_segments, subject_matches], kinds={"webdataset"})
def training_shards(
    context: dg.AssetExecutionContext,
    config: ShardsConfig,
    store: DatasetStore,
    captioner: CaptionerResource,
    segmenter: SegmenterResource,
    matcher: MatcherResource,
) -> dg.MaterializeResult:
    """Webdataset shards (train/val) of every image with at least one subject, plus the failure
    ledger of every image left out. Complete shards of an unchanged plan are kept (resume)."""
    from fc_pipeline.data.shards import read_samples, write_shards

    out_dir = store.path(SHARDS)
    models = {"profile": captioner.profile, **captioner.model_ids(), **segmenter.model_ids(), **matcher.model_ids()}
    stats = write_shards(
        *(read_parquet(store.path(name)) for name in (IMAGES, PHRASES, SEGMENTS, MATCHES)),
        out_dir,
        samples_per_shard=config.samples_per_shard,
        val_fraction=config.val_fraction,
        val_max=config.val_max,
        models=models,
    )
    context.log.info(f"shards written: {len(stats['written'])}, kept from an earlier run: {len(stats['skipped'])}")
    sidecars = sorted(out_dir.glob("*/[0-9]*.parquet"))
    samples = list(read_samples(out_dir, "train"))[:PREVIEW_IMAGES]
    examples = [
        {"id": s["id"], "caption": s["meta"]["caption"], "subjects": ", ".join(x["phrase"] for x in s["meta"]["subjects"])}
        for s in samples
    ]
    overlays = [overlay_segments(s["image"], s["seg"], [x["segment_id"] for x in s["meta"]["subjects"]]) for s in samples]
    return _result(
        context,
        status="computed" if stats["written"] else "cached",
        rows=stats["samples"],
        failures=stats["failures"],
        path=out_dir,
        version=step_fingerprint(sidecars, {}),
        images_in=stats["images"],
        samples_out=dg.MetadataValue.json({split: s["samples"] for split, s in stats["splits"].items()}),
        shards=dg.MetadataValue.json({split: len(s["shards"]) for split, s in stats["splits"].items()}),
        subjects_per_sample=dg.MetadataValue.json(stats["subjects_histogram"]),
        failure_ledger=dg.MetadataValue.path(stats["paths"]["failures"]),
        models=dg.MetadataValue.json(models),
        examples=dg.MetadataValue.md(markdown_table(examples, ["id", "caption", "subjects"])),
        **_preview(store, "training_shards", overlays),
    )
