"""The dataset-construction chain (docs/architecture.md, "Dataset construction") as Dagster assets, group ``dataset``.

corpus_images -> captions -> noun_phrases ─┐
             └-> panoptic_segments ────────┴-> subject_matches -> training_shards

Every asset is partitioned by corpus (:mod:`assets.partitions`) and calls :mod:`fc_pipeline.data`.
The five per-image steps are graph-backed assets whose work fans out over chunks of the corpus
(:mod:`assets.chunked`; one chunk unless the ``store`` resource says more). Each step's table is
written as parquet under the corpus's dataset dir (see :class:`~assets.resources.DatasetStore`)
and downstream assets read it from there, so nothing is pickled. Steps are incremental: a re-run
computes only the images whose inputs or settings changed (:mod:`fc_pipeline.data.incremental`;
metadata ``computed``/``reused``, ``status: cached`` when nothing was new) and ``training_shards``
appends new shards.
"""

import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

from .chunked import Chunk, MergeResult, chunked_graph
from .metadata import caption_examples, contact_sheet, failure_counts, markdown_table, overlay_segments, save_preview
from .partitions import corpus_partitions
from .resources import CaptionerResource, DatasetStore, MatcherResource, SegmenterResource
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
LISTING = "images.listing.parquet"  # the files to scan, while corpus_images runs


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


def _resource_settings(resource: dg.ConfigurableResource) -> dict:
    return {name: getattr(resource, name) for name in type(resource).model_fields}


def _metadata(
    context: dg.OpExecutionContext, *, status: str, rows: int, failures: dict, path: Path, **metadata
) -> dict[str, Any]:
    """The metadata every dataset asset reports (and a log line of it)."""
    name = context.asset_key.to_user_string()
    context.log.info(f"{name}[{context.partition_key}]: {status}, {rows} rows, failures {failures or 'none'}")
    return {
        "corpus": context.partition_key,
        "status": status,
        "rows": rows,
        "failed": sum(failures.values()),
        "failures_by_reason": dg.MetadataValue.json(failures),
        "path": dg.MetadataValue.path(str(path)),
        **metadata,
    }


def update_chunk_of(
    context: dg.OpExecutionContext,
    part: Chunk,
    output: str,
    inputs: tuple[str, ...],
    settings: dict,
    compute: Callable[..., pa.Table],
    **options,
) -> dict[str, int]:
    """Bring one chunk of the corpus's step table ``output`` up to date from the tables ``inputs``;
    the counts for the chunk step's metadata. ``options``: see :func:`~fc_pipeline.data.chunks.update_chunk`."""
    from fc_pipeline.data.chunks import update_chunk

    store, corpus = context.resources.store, context.partition_key
    update = update_chunk(
        store.path(corpus, output),
        read_inputs(store, corpus, *inputs),
        settings,
        compute,
        chunk=part.index,
        chunks=part.count,
        **options,
    )
    return {"computed": update.computed, "reused": update.reused, "dropped": update.dropped}


def merge_table(
    context: dg.OpExecutionContext, chunks: int, output: str, first: pa.Table
) -> tuple[pa.Table, MergeResult]:
    """Merge the chunks of the corpus's step table ``output`` (rows in the order of the step's first
    input table ``first``): the table, and the asset's metadata (counts, failures) and data version."""
    from fc_pipeline.data.chunks import merge_chunks

    store, corpus = context.resources.store, context.partition_key
    path = store.path(corpus, output)
    update = merge_chunks(path, first.column("id").to_pylist(), chunks)
    result = _metadata(
        context,
        status=update.status,
        rows=update.table.num_rows,
        failures=failure_counts(update.table),
        path=path,
        computed=update.computed,
        reused=update.reused,
        dropped=update.dropped,
        chunks=chunks,
    )
    return update.table, MergeResult(result, file_digest(path))


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


# corpus_images: the listing, then each chunk hashes and decodes its files, then duplicates collapse
def _corpus_source(context: dg.OpExecutionContext, config: CorpusImagesConfig) -> Path:
    store, corpus = context.resources.store, context.partition_key
    return Path(config.source) if config.source else store.source(corpus)


def _list_corpus(context: dg.OpExecutionContext, config: CorpusImagesConfig) -> None:
    from fc_pipeline.data.corpus import list_corpus
    from fc_pipeline.locks import locked_output

    store, corpus = context.resources.store, context.partition_key
    source = _corpus_source(context, config)
    if not config.source and corpus == DEMO_CORPUS:
        context.log.info(f"drawing the demo corpus ({config.demo_images} files) into {source}")
        make_demo_corpus(source, n=config.demo_images)
    if not source.exists():
        raise dg.Failure(f"corpus {corpus!r} not found: no folder or manifest at {source}")
    context.log.info(f"listing {source}")
    try:
        entries = list_corpus(source)
    except ValueError as exc:  # a bad manifest
        raise dg.Failure(str(exc)) from None
    listing = store.path(corpus, LISTING)
    with locked_output(listing):
        write_parquet(entries, listing)


def _scan_chunk(context: dg.OpExecutionContext, config: CorpusImagesConfig, part: Chunk) -> dict[str, int]:
    from fc_pipeline.data.chunks import chunk_path, chunk_rows
    from fc_pipeline.data.corpus import scan_files
    from fc_pipeline.locks import locked_output

    store, corpus = context.resources.store, context.partition_key
    entries = chunk_rows(read_parquet(store.path(corpus, LISTING)), part.index, part.count, key="path")
    output = store.path(corpus, IMAGES)
    files = scan_files(entries, previous=read_parquet(output) if output.exists() else None)
    path = chunk_path(output, part.index, part.count)
    with locked_output(path):
        write_parquet(files, path)
    return {"files": files.num_rows, "unreadable": files.num_rows - files.column("error").null_count}


def _merge_scan(context: dg.OpExecutionContext, config: CorpusImagesConfig, chunks: int) -> MergeResult:
    from fc_pipeline.data.chunks import read_chunks, remove_chunk_files
    from fc_pipeline.data.corpora import corpus_signature
    from fc_pipeline.data.corpus import collapse_duplicates
    from fc_pipeline.locks import locked_output

    store, corpus = context.resources.store, context.partition_key
    source = _corpus_source(context, config)
    output = store.path(corpus, IMAGES)
    with locked_output(output):  # one writer; clears the temp files of a killed one
        table = collapse_duplicates(pa.concat_tables(read_chunks(output, chunks)))
        previous = read_parquet(output) if output.exists() else None
        unchanged = previous is not None and previous.equals(table)
        if not unchanged:
            write_parquet(table, output)
        remove_chunk_files(output)
        store.path(corpus, LISTING).unlink(missing_ok=True)
    known = set() if previous is None else set(previous.column("id").to_pylist())
    new_ids = set(table.column("id").to_pylist()) - known
    readable = table.filter(pc.is_null(table.column("error")))
    sample = [load_image(p) for p in readable.column("path").to_pylist()[:PREVIEW_IMAGES]]
    metadata = _metadata(
        context,
        status="cached" if unchanged else "computed" if previous is None else "updated",
        rows=table.num_rows,
        failures=failure_counts(table),
        path=output,
        new_images=len(new_ids),
        chunks=chunks,
        source=dg.MetadataValue.path(str(source)),
        source_signature=corpus_signature(source),
        images=table.num_rows,
        readable=readable.num_rows,
        with_caption=table.num_rows - table.column("caption").null_count,
        with_annotation=table.num_rows - table.column("annotation").null_count,
        **_preview(store, corpus, "corpus_images", sample),
    )
    return MergeResult(metadata, file_digest(output))


_scan = chunked_graph(
    "corpus_images", CorpusImagesConfig, prepare=_list_corpus, run_chunk=_scan_chunk, merge=_merge_scan
)


@dg.graph_asset(**DATASET_ASSET, config=_scan.config, kinds={"parquet"})
def corpus_images():
    """Every image of the corpus, once (id = sha256 prefix of its bytes), with the caption and
    panoptic annotation the corpus provides and a reason code for files that cannot be read.
    Files already scanned keep their decode result; only new files are decoded."""
    return _scan.compose()


# captions
def _caption_chunk(context: dg.OpExecutionContext, config: CaptionsConfig, part: Chunk) -> dict[str, int]:
    from fc_pipeline.data.captioning import caption_corpus

    captioner: CaptionerResource = context.resources.captioner
    with captioner.loaded() as load:
        return update_chunk_of(
            context,
            part,
            CAPTIONS,
            (IMAGES,),
            {"captioner": _resource_settings(captioner)},
            lambda images: caption_corpus(images, load, batch_size=config.batch_size),
        )


def _merge_captions(context: dg.OpExecutionContext, config: CaptionsConfig, chunks: int) -> MergeResult:
    (images,) = read_inputs(context.resources.store, context.partition_key, IMAGES)
    table, result = merge_table(context, chunks, CAPTIONS, images)
    sources = table.column("caption_source").to_pylist()
    rows = [r for r in table.to_pylist() if r["caption"]]
    examples = [r for r in rows if r["caption_source"] == "model"][:3] + [
        r for r in rows if r["caption_source"] == "provided"
    ][:3]
    result.metadata.update(
        provided=sources.count("provided"),
        generated=sources.count("model"),
        examples=dg.MetadataValue.md(markdown_table(examples, ["id", "caption_source", "caption"])),
    )
    return result


_captions = chunked_graph(
    "captions",
    CaptionsConfig,
    after=[corpus_images],
    run_chunk=_caption_chunk,
    merge=_merge_captions,
    resources=["captioner"],
    gpu=True,
)


@dg.graph_asset(**DATASET_ASSET, ins=_captions.ins, config=_captions.config, kinds={"pytorch", "parquet"})
def captions(corpus_images):
    """A caption per image: the one the corpus provides, else BLIP-2's (model built only if needed)."""
    return _captions.compose(corpus_images)


# panoptic_segments
def _segment_chunk(context: dg.OpExecutionContext, config: SegmentsConfig, part: Chunk) -> dict[str, int]:
    from fc_pipeline.data.segmentation import segment_corpus

    segmenter: SegmenterResource = context.resources.segmenter
    maps = context.resources.store.path(context.partition_key, SEGMENT_MAPS)
    with segmenter.loaded() as load:
        return update_chunk_of(
            context,
            part,
            SEGMENTS,
            (IMAGES,),
            {"segmenter": _resource_settings(segmenter)},
            lambda rows: segment_corpus(rows, load, maps, batch_size=config.batch_size),
            temp_dirs=[maps],
        )


def _merge_segments(context: dg.OpExecutionContext, config: SegmentsConfig, chunks: int) -> MergeResult:
    store, corpus = context.resources.store, context.partition_key
    (images,) = read_inputs(store, corpus, IMAGES)
    table, result = merge_table(context, chunks, SEGMENTS, images)
    per_image = {r["id"]: json.loads(r["segments"] or "[]") for r in table.to_pylist() if not r["error"]}
    labels = [s["label"] for segs in per_image.values() for s in segs]
    shown = {i: None for i, segs in per_image.items() if segs}
    sources = table.column("segment_source").to_pylist()
    result.metadata.update(
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
    return result


_segments = chunked_graph(
    "panoptic_segments",
    SegmentsConfig,
    after=[corpus_images],
    run_chunk=_segment_chunk,
    merge=_merge_segments,
    resources=["segmenter"],
    gpu=True,
)


@dg.graph_asset(**DATASET_ASSET, ins=_segments.ins, config=_segments.config, kinds={"pytorch", "parquet"})
def panoptic_segments(corpus_images):
    """Panoptic segments per image (Mask2Former, or the corpus's own annotation) and a 16-bit id map."""
    return _segments.compose(corpus_images)


# noun_phrases
def _phrase_chunk(context: dg.OpExecutionContext, config: PhrasesConfig, part: Chunk) -> dict[str, int]:
    from fc_pipeline.data.phrases import phrase_corpus

    spacy_model = get_profile(config.profile).spacy
    return update_chunk_of(
        context,
        part,
        PHRASES,
        (CAPTIONS,),
        {"spacy": spacy_model},
        lambda rows: phrase_corpus(rows, spacy_model=spacy_model, batch_size=config.batch_size),
    )


def _merge_phrases(context: dg.OpExecutionContext, config: PhrasesConfig, chunks: int) -> MergeResult:
    (captions,) = read_inputs(context.resources.store, context.partition_key, CAPTIONS)
    table, result = merge_table(context, chunks, PHRASES, captions)
    rows = [r for r in table.to_pylist() if not r["error"]]
    result.metadata.update(
        phrases=sum(len(json.loads(r["phrases"] or "[]")) for r in rows),
        expanded_captions=sum(r["caption"] != r["raw_caption"] for r in rows),
        examples=dg.MetadataValue.md(caption_examples(table)),
    )
    return result


_phrases = chunked_graph("noun_phrases", PhrasesConfig, after=[captions], run_chunk=_phrase_chunk, merge=_merge_phrases)


@dg.graph_asset(**DATASET_ASSET, ins=_phrases.ins, config=_phrases.config, kinds={"spacy", "parquet"})
def noun_phrases(captions):
    """Noun phrases of each caption (spaCy), numbered plurals expanded: "two women" -> "a woman and a woman"."""
    return _phrases.compose(captions)


# subject_matches
def _match_chunk(context: dg.OpExecutionContext, config: MatchesConfig, part: Chunk) -> dict[str, int]:
    from fc_pipeline.data.matching import match_corpus

    matcher: MatcherResource = context.resources.matcher
    settings = {
        "matcher": _resource_settings(matcher),
        "threshold": config.threshold,
        "max_subjects": config.max_subjects,
    }
    with matcher.loaded() as load:
        return update_chunk_of(
            context,
            part,
            MATCHES,
            (IMAGES, SEGMENTS, PHRASES),
            settings,
            lambda *rows: match_corpus(*rows, load, threshold=config.threshold, max_subjects=config.max_subjects),
        )


def _merge_matches(context: dg.OpExecutionContext, config: MatchesConfig, chunks: int) -> MergeResult:
    store, corpus = context.resources.store, context.partition_key
    images, segments = read_inputs(store, corpus, IMAGES, SEGMENTS)
    table, result = merge_table(context, chunks, MATCHES, images)
    subjects = {r["id"]: json.loads(r["subjects"] or "[]") for r in table.to_pylist() if not r["error"]}
    histogram = np.bincount([len(s) for s in subjects.values()], minlength=config.max_subjects + 1).tolist()
    shown = {i: [s["segment_id"] for s in subs] for i, subs in subjects.items() if subs}
    result.metadata.update(
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
    return result


_matches = chunked_graph(
    "subject_matches",
    MatchesConfig,
    after=[corpus_images, panoptic_segments, noun_phrases],
    run_chunk=_match_chunk,
    merge=_merge_matches,
    resources=["matcher"],
    gpu=True,
)


@dg.graph_asset(
    **DATASET_ASSET,
    ins=_matches.ins,
    config=_matches.config,
    kinds={"pytorch", "parquet"},
)
def subject_matches(corpus_images, panoptic_segments, noun_phrases):
    """Subjects per image: noun phrases matched one-to-one to ``person`` segments (CLIP × SBERT score)."""
    return _matches.compose(corpus_images, panoptic_segments, noun_phrases)


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
    metadata = _metadata(
        context,
        status={"unchanged": "cached", "appended": "updated", "rebuilt": "computed"}[stats["mode"]],
        rows=stats["samples"],
        failures=stats["failures"],
        path=out_dir,
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
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(shards_version(out_dir)))


# the chain in order (assets.instance.DATASET_ASSETS names it for code that cannot import this module)
CHAIN = [corpus_images, captions, panoptic_segments, noun_phrases, subject_matches, training_shards]

STEP_CONFIGS.update(
    {
        corpus_images.node_def.name: CorpusImagesConfig,
        captions.node_def.name: CaptionsConfig,
        panoptic_segments.node_def.name: SegmentsConfig,
        noun_phrases.node_def.name: PhrasesConfig,
        subject_matches.node_def.name: MatchesConfig,
        training_shards.node_def.name: ShardsConfig,
    }
)
