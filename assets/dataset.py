"""The dataset-construction chain (docs/architecture.md, "Dataset construction") as Dagster assets, group ``dataset``.

corpus_images -> captions -> noun_phrases ─┐
             └-> panoptic_segments ────────┴-> subject_matches -> training_shards

Every asset is partitioned by corpus (:mod:`assets.partitions`) and is one call into
:mod:`fc_pipeline.data`; its table is written as parquet under the corpus's dataset dir (see
:class:`~assets.resources.DatasetStore`) and downstream assets read it from there, so nothing is
pickled. Steps are incremental: a re-run computes only the images whose inputs or settings changed
(:func:`fc_pipeline.data.incremental.update_table`; metadata ``computed``/``reused``, ``status:
cached`` when nothing was new) and ``training_shards`` appends new shards.
"""

import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from fc_pipeline.data.demo_corpus import DEFAULT_SIZE as DEMO_SIZE
from fc_pipeline.data.demo_corpus import DEMO_CORPUS, make_demo_corpus
from fc_pipeline.data.segmentation import read_id_map
from fc_pipeline.data.settings import DatasetSettings
from fc_pipeline.images import load_image
from fc_pipeline.profiles import get_profile
from fc_pipeline.storage import read_parquet, write_parquet

from .deployment import GPU_OP_TAGS
from .metadata import caption_examples, contact_sheet, failure_counts, markdown_table, overlay_segments, save_preview
from .partitions import corpus_partitions
from .resources import GPU_POOL, CaptionerResource, DatasetStore, MatcherResource, SegmenterResource
from .settings import STEP_CONFIGS, check_run_config, config_class

GROUP = "dataset"
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
        description="Corpus folder or parquet/jsonl manifest. Empty: <data_root>/corpora/<partition> "
        "(folder, or .jsonl/.parquet manifest); for the 'demo' corpus the demo images are drawn there first.",
    )
    demo_images: int = Field(default=DEMO_SIZE, description="Size of the drawn demo corpus.")


def _step_config(name: str, doc: str, **fields: str) -> type[dg.Config]:
    """The config of one dataset step: ``{Dagster name: DatasetSettings field}`` of the library's settings."""
    rename = {library: dagster for dagster, library in fields.items()}
    return config_class(DatasetSettings, name, doc, include=fields.values(), rename=rename)


CaptionsConfig = _step_config("CaptionsConfig", "Captioning batch size.", batch_size="caption_batch_size")
SegmentsConfig = _step_config("SegmentsConfig", "Segmentation batch size.", batch_size="segment_batch_size")
MatchesConfig = _step_config(
    "MatchesConfig", "Phrase–segment matching.", threshold="match_threshold", max_subjects="max_subjects"
)
ShardsConfig = _step_config(
    "ShardsConfig",
    "Webdataset shards and the validation split.",
    samples_per_shard="samples_per_shard",
    val_fraction="val_fraction",
    val_max="val_max",
    rebuild="rebuild",
)


class PhrasesConfig(_step_config("PhrasesStep", "spaCy batch size.", batch_size="phrase_batch_size")):
    profile: str = Field(default="tiny", description="Model profile naming the spaCy pipeline.")


# --- step bookkeeping -------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def shards_version(shards_dir: Path) -> str:
    """Data version of a dataset's shards: a digest (16 hex) of every shard's parquet sidecar."""
    digest = hashlib.sha256()
    for path in sorted(shards_dir.glob("*/[0-9]*.parquet")):
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


def read_inputs(store: DatasetStore, corpus: str, *names: str) -> list[pa.Table]:
    """The upstream tables of a step, with a clear error when one was never materialised."""
    paths = [store.path(corpus, name) for name in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise dg.Failure(
            f"upstream output missing: {missing}; materialise the upstream assets of partition {corpus!r} first"
        )
    return [read_parquet(p) for p in paths]


def update_step(
    output: Path, inputs: list[pa.Table], settings: dict, compute: Callable[..., pa.Table], **options
) -> tuple[pa.Table, dict]:
    """Bring a step's table up to date (only images it has not seen are computed); the table and
    the counts for the asset's metadata. ``options``: see :func:`~fc_pipeline.data.incremental.update_table`."""
    from fc_pipeline.data.incremental import update_table

    update = update_table(output, inputs, settings, compute, **options)
    return update.table, {
        "status": update.status,
        "computed": update.computed,
        "reused": update.reused,
        "dropped": update.dropped,
    }


def _resource_settings(resource: dg.ConfigurableResource) -> dict:
    return {name: getattr(resource, name) for name in type(resource).model_fields}


def _result(
    context: dg.AssetExecutionContext, *, status: str, rows: int, failures: dict, path: Path, version: str, **metadata
) -> dg.MaterializeResult:
    context.log.info(
        f"{context.asset_key.to_user_string()}[{context.partition_key}]: {status}, {rows} rows, "
        f"failures {failures or 'none'}"
    )
    return dg.MaterializeResult(
        metadata={
            "corpus": context.partition_key,
            "status": status,
            "rows": rows,
            "failed": sum(failures.values()),
            "failures_by_reason": dg.MetadataValue.json(failures),
            "path": dg.MetadataValue.path(str(path)),
            **metadata,
        },
        data_version=dg.DataVersion(version[:16]),
    )


def _table_result(
    context: dg.AssetExecutionContext, table: pa.Table, output: Path, counts: dict, **metadata
) -> dg.MaterializeResult:
    return _result(
        context,
        rows=table.num_rows,
        failures=failure_counts(table),
        path=output,
        version=file_digest(output),
        **counts,
        **metadata,
    )


def _preview(store: DatasetStore, corpus: str, name: str, pictures: list[Image.Image]) -> dict:
    if not pictures:
        return {}
    path = store.path(corpus, PREVIEWS) / f"{name}.png"
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
DATASET_ASSET = {"group_name": GROUP, "partitions_def": corpus_partitions}
MODEL_STEP = {**DATASET_ASSET, "pool": GPU_POOL, "op_tags": GPU_OP_TAGS}


@dg.asset(**DATASET_ASSET, kinds={"parquet"})
def corpus_images(
    context: dg.AssetExecutionContext, config: CorpusImagesConfig, store: DatasetStore
) -> dg.MaterializeResult:
    """Every image of the corpus, once (id = sha256 prefix of its bytes), with the caption and
    panoptic annotation the corpus provides and a reason code for files that cannot be read.
    Files already scanned keep their decode result; only new files are decoded."""
    from fc_pipeline.data.corpora import corpus_signature
    from fc_pipeline.data.corpus import scan_corpus
    from fc_pipeline.locks import locked_output

    check_run_config(context)
    corpus = context.partition_key
    source = Path(config.source) if config.source else store.source(corpus)
    if not config.source and corpus == DEMO_CORPUS:
        context.log.info(f"drawing the demo corpus ({config.demo_images} files) into {source}")
        make_demo_corpus(source, n=config.demo_images)
    if not source.exists():
        raise dg.Failure(f"corpus {corpus!r} not found: no folder or manifest at {source}")
    output = store.path(corpus, IMAGES)
    previous = read_parquet(output) if output.exists() else None
    signature = corpus_signature(source)
    context.log.info(f"scanning {source}")
    table = scan_corpus(source, previous=previous)
    unchanged = previous is not None and previous.equals(table)
    with locked_output(output):  # one writer; clears the temp files of a killed one
        if not unchanged:
            write_parquet(table, output)
    known = set() if previous is None else set(previous.column("id").to_pylist())
    new_ids = set(table.column("id").to_pylist()) - known
    readable = table.filter(pc.is_null(table.column("error")))
    sample = [load_image(p) for p in readable.column("path").to_pylist()[:PREVIEW_IMAGES]]
    return _table_result(
        context,
        table,
        output,
        {
            "status": "cached" if unchanged else "computed" if previous is None else "updated",
            "new_images": len(new_ids),
        },
        source=dg.MetadataValue.path(str(source)),
        source_signature=signature,
        images=table.num_rows,
        readable=readable.num_rows,
        with_caption=table.num_rows - table.column("caption").null_count,
        with_annotation=table.num_rows - table.column("annotation").null_count,
        **_preview(store, corpus, "corpus_images", sample),
    )


@dg.asset(**MODEL_STEP, deps=[corpus_images], kinds={"pytorch", "parquet"})
def captions(
    context: dg.AssetExecutionContext, config: CaptionsConfig, store: DatasetStore, captioner: CaptionerResource
) -> dg.MaterializeResult:
    """A caption per image: the one the corpus provides, else BLIP-2's (model built only if needed)."""
    from fc_pipeline.data.captioning import caption_corpus

    check_run_config(context)
    corpus = context.partition_key
    output = store.path(corpus, CAPTIONS)
    with captioner.loaded() as load:
        table, counts = update_step(
            output,
            read_inputs(store, corpus, IMAGES),
            {"captioner": _resource_settings(captioner)},
            lambda images: caption_corpus(images, load, batch_size=config.batch_size),
        )
    sources = table.column("caption_source").to_pylist()
    rows = [r for r in table.to_pylist() if r["caption"]]
    examples = [r for r in rows if r["caption_source"] == "model"][:3] + [
        r for r in rows if r["caption_source"] == "provided"
    ][:3]
    return _table_result(
        context,
        table,
        output,
        counts,
        provided=sources.count("provided"),
        generated=sources.count("model"),
        examples=dg.MetadataValue.md(markdown_table(examples, ["id", "caption_source", "caption"])),
    )


@dg.asset(**MODEL_STEP, deps=[corpus_images], kinds={"pytorch", "parquet"})
def panoptic_segments(
    context: dg.AssetExecutionContext, config: SegmentsConfig, store: DatasetStore, segmenter: SegmenterResource
) -> dg.MaterializeResult:
    """Panoptic segments per image (Mask2Former, or the corpus's own annotation) and a 16-bit id map."""
    from fc_pipeline.data.segmentation import segment_corpus

    check_run_config(context)
    corpus = context.partition_key
    output = store.path(corpus, SEGMENTS)
    (images,) = read_inputs(store, corpus, IMAGES)
    with segmenter.loaded() as load:
        table, counts = update_step(
            output,
            [images],
            {"segmenter": _resource_settings(segmenter)},
            lambda rows: segment_corpus(rows, load, store.path(corpus, SEGMENT_MAPS), batch_size=config.batch_size),
            temp_dirs=[store.path(corpus, SEGMENT_MAPS)],
        )
    per_image = {r["id"]: json.loads(r["segments"] or "[]") for r in table.to_pylist() if not r["error"]}
    labels = [s["label"] for segs in per_image.values() for s in segs]
    shown = {i: None for i, segs in per_image.items() if segs}
    sources = table.column("segment_source").to_pylist()
    return _table_result(
        context,
        table,
        output,
        counts,
        segments=len(labels),
        person_segments=labels.count("person"),
        provided=sources.count("provided"),
        predicted=sources.count("model"),
        segment_maps=dg.MetadataValue.path(str(store.path(corpus, SEGMENT_MAPS))),
        **_preview(
            store,
            corpus,
            "panoptic_segments",
            _segment_overlays(images, table, dict(list(shown.items())[:PREVIEW_IMAGES])),
        ),
    )


@dg.asset(**DATASET_ASSET, deps=[captions], kinds={"spacy", "parquet"})
def noun_phrases(context: dg.AssetExecutionContext, config: PhrasesConfig, store: DatasetStore) -> dg.MaterializeResult:
    """Noun phrases of each caption (spaCy), numbered plurals expanded: "two women" -> "a woman and a woman"."""
    from fc_pipeline.data.phrases import phrase_corpus

    check_run_config(context)
    corpus = context.partition_key
    output = store.path(corpus, PHRASES)
    spacy_model = get_profile(config.profile).spacy
    table, counts = update_step(
        output,
        read_inputs(store, corpus, CAPTIONS),
        {"spacy": spacy_model},
        lambda rows: phrase_corpus(rows, spacy_model=spacy_model, batch_size=config.batch_size),
    )
    rows = [r for r in table.to_pylist() if not r["error"]]
    return _table_result(
        context,
        table,
        output,
        counts,
        phrases=sum(len(json.loads(r["phrases"] or "[]")) for r in rows),
        expanded_captions=sum(r["caption"] != r["raw_caption"] for r in rows),
        examples=dg.MetadataValue.md(caption_examples(table)),
    )


@dg.asset(**MODEL_STEP, deps=[corpus_images, panoptic_segments, noun_phrases], kinds={"pytorch", "parquet"})
def subject_matches(
    context: dg.AssetExecutionContext, config: MatchesConfig, store: DatasetStore, matcher: MatcherResource
) -> dg.MaterializeResult:
    """Subjects per image: noun phrases matched one-to-one to ``person`` segments (CLIP × SBERT score)."""
    from fc_pipeline.data.matching import match_corpus

    check_run_config(context)
    corpus = context.partition_key
    output = store.path(corpus, MATCHES)
    images, segments, phrases = read_inputs(store, corpus, IMAGES, SEGMENTS, PHRASES)
    settings = {
        "matcher": _resource_settings(matcher),
        "threshold": config.threshold,
        "max_subjects": config.max_subjects,
    }
    with matcher.loaded() as load:
        table, counts = update_step(
            output,
            [images, segments, phrases],
            settings,
            lambda *rows: match_corpus(*rows, load, threshold=config.threshold, max_subjects=config.max_subjects),
        )
    subjects = {r["id"]: json.loads(r["subjects"] or "[]") for r in table.to_pylist() if not r["error"]}
    histogram = np.bincount([len(s) for s in subjects.values()], minlength=config.max_subjects + 1).tolist()
    shown = {i: [s["segment_id"] for s in subs] for i, subs in subjects.items() if subs}
    return _table_result(
        context,
        table,
        output,
        counts,
        subjects=sum(histogram[k] * k for k in range(len(histogram))),
        images_with_subjects=len(shown),
        subjects_per_image=dg.MetadataValue.json({str(k): n for k, n in enumerate(histogram)}),
        **_preview(
            store,
            corpus,
            "subject_matches",
            _segment_overlays(images, segments, dict(list(shown.items())[:PREVIEW_IMAGES])),
        ),
    )


@dg.asset(**DATASET_ASSET, deps=[corpus_images, noun_phrases, panoptic_segments, subject_matches], kinds={"webdataset"})
def training_shards(
    context: dg.AssetExecutionContext,
    config: ShardsConfig,
    store: DatasetStore,
    captioner: CaptionerResource,
    segmenter: SegmenterResource,
    matcher: MatcherResource,
) -> dg.MaterializeResult:
    """Webdataset shards (train/val) of every image with at least one subject, plus the failure
    ledger of every image left out. New images go into new shards; complete shards are never rewritten."""
    from fc_pipeline.data.shards import read_samples, write_shards

    check_run_config(context)
    corpus = context.partition_key
    out_dir = store.path(corpus, SHARDS)
    models = {"profile": captioner.profile, **captioner.model_ids(), **segmenter.model_ids(), **matcher.model_ids()}
    stats = write_shards(
        *read_inputs(store, corpus, IMAGES, PHRASES, SEGMENTS, MATCHES),
        out_dir,
        samples_per_shard=config.samples_per_shard,
        val_fraction=config.val_fraction,
        val_max=config.val_max,
        models=models,
        rebuild=config.rebuild,
    )
    context.log.info(
        f"shards: {stats['mode']}, {len(stats['written'])} written, {len(stats['skipped'])} kept, "
        f"{stats['appended']} new samples"
    )
    samples = list(itertools.islice(read_samples(out_dir, "train"), PREVIEW_IMAGES))  # decodes only these
    examples = [
        {
            "id": s["id"],
            "caption": s["meta"]["caption"],
            "subjects": ", ".join(x["phrase"] for x in s["meta"]["subjects"]),
        }
        for s in samples
    ]
    overlays = [
        overlay_segments(s["image"], s["seg"], [x["segment_id"] for x in s["meta"]["subjects"]]) for s in samples
    ]
    return _result(
        context,
        status={"unchanged": "cached", "appended": "updated", "rebuilt": "computed"}[stats["mode"]],
        rows=stats["samples"],
        failures=stats["failures"],
        path=out_dir,
        version=shards_version(out_dir),
        mode=stats["mode"],
        appended=stats["appended"],
        shards_written=len(stats["written"]),
        shards_kept=len(stats["skipped"]),
        stale=stats["stale"],
        orphaned=stats["orphaned"],
        images_in=stats["images"],
        samples_out=dg.MetadataValue.json({split: s["samples"] for split, s in stats["splits"].items()}),
        shards=dg.MetadataValue.json({split: len(s["shards"]) for split, s in stats["splits"].items()}),
        subjects_per_sample=dg.MetadataValue.json(stats["subjects_histogram"]),
        failure_ledger=dg.MetadataValue.path(stats["paths"]["failures"]),
        models=dg.MetadataValue.json(models),
        examples=dg.MetadataValue.md(markdown_table(examples, ["id", "caption", "subjects"])),
        **_preview(store, corpus, "training_shards", overlays),
    )


STEP_CONFIGS.update(
    {
        corpus_images.op.name: CorpusImagesConfig,
        captions.op.name: CaptionsConfig,
        panoptic_segments.op.name: SegmentsConfig,
        noun_phrases.op.name: PhrasesConfig,
        subject_matches.op.name: MatchesConfig,
        training_shards.op.name: ShardsConfig,
    }
)
