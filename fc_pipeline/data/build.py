"""The whole dataset chain without Dagster (``fc-pipeline build-dataset``).

``out_dir`` receives the same files the Dagster assets write under ``<data_root>/<corpus>/``:
``images.parquet``, ``captions.parquet``, ``segments.parquet`` + ``segments/<id>.png``,
``phrases.parquet``, ``matches.parquet`` and ``shards/`` (see :mod:`fc_pipeline.data.shards`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from fc_pipeline.data.captioning import Captioner, caption_corpus
from fc_pipeline.data.corpus import scan_corpus
from fc_pipeline.data.incremental import update_table
from fc_pipeline.data.matching import SubjectMatcher, match_corpus
from fc_pipeline.data.phrases import phrase_corpus
from fc_pipeline.data.segmentation import Segmenter, segment_corpus
from fc_pipeline.data.settings import DatasetSettings
from fc_pipeline.data.shards import write_shards
from fc_pipeline.locks import locked_output, remove_temp_files, writer_lock
from fc_pipeline.profiles import ModelProfile, get_profile
from fc_pipeline.storage import read_parquet, write_json, write_parquet


def dataset_model_ids(profile: ModelProfile) -> dict[str, str]:
    """What each step's model is, as recorded in every sample's json (``models``)."""

    def named(field: str) -> str:
        return f"tiny-random:{field}:seed={profile.seed}" if profile.tiny else getattr(profile, field)

    clip = named("matcher_clip") if profile.tiny else f"{profile.matcher_clip}/{profile.matcher_clip_pretrained}"
    return {
        "profile": profile.name,
        "captioner": named("captioner"),
        "segmenter": named("segmenter"),
        "matcher_clip": clip,
        "sbert": profile.sbert,
        "spacy": profile.spacy,
    }


def build_dataset(
    source: str | Path,
    out_dir: str | Path,
    profile: ModelProfile | str = "tiny",
    *,
    device: str = "cpu",
    dtype: Any = None,
    settings: DatasetSettings | None = None,
    captioner: Captioner | Callable[[], Captioner] | None = None,
    segmenter: Segmenter | Callable[[], Segmenter] | None = None,
    matcher: SubjectMatcher | Callable[[], SubjectMatcher] | None = None,
    **options: Any,
) -> dict:
    """Corpus -> captions -> segments -> phrases -> matches -> shards; returns the shard stats
    plus ``paths`` of every intermediate file, ``seconds`` per step and, per model step,
    ``steps[name] = {computed, reused, dropped}`` rows.

    ``settings`` (or its fields as keyword ``options``, e.g. ``samples_per_shard=2``) are the
    :class:`~fc_pipeline.data.settings.DatasetSettings`; they are checked before anything is read.

    The build holds the lock of ``out_dir`` (:func:`fc_pipeline.locks.writer_lock`) from start to
    end: a second build of the same folder is refused with
    :class:`~fc_pipeline.locks.WriterLockHeld` naming the first one. A file the disk refuses ends
    the build with :class:`~fc_pipeline.storage.WriteError`; the next build resumes.
    A re-run on the same ``out_dir`` only processes images whose inputs or settings changed, e.g.
    the new files of a grown corpus (see :mod:`fc_pipeline.data.incremental`). Models are built
    from ``profile`` only when some image needs them; pass ``captioner``, ``segmenter`` or
    ``matcher`` (instances or factories) to use others — the step settings name the profile's
    models, so use a fresh ``out_dir`` when swapping models that way.
    """
    settings = settings or DatasetSettings(**options)
    profile = get_profile(profile)
    out_dir = Path(out_dir)
    with writer_lock(out_dir, what="dataset build"):
        remove_temp_files(out_dir, ".build_stats.json.")
        captioner = captioner or _once(lambda: Captioner(profile, device, dtype, settings.max_new_tokens))
        segmenter = segmenter or _once(lambda: Segmenter(profile, device, *thresholds, dtype))
        thresholds = [settings.segment_threshold, settings.mask_threshold, settings.overlap_mask_area_threshold]
        matcher = matcher or _once(lambda: SubjectMatcher(profile, device, dtype))
        model_ids = dataset_model_ids(profile)
        seconds: dict[str, float] = {}
        paths: dict[str, str] = {}
        steps: dict[str, dict[str, int]] = {}

        def step(name: str, inputs: list[pa.Table], recorded: dict, compute: Callable[..., pa.Table], **kw) -> pa.Table:
            started = time.perf_counter()
            update = update_table(out_dir / f"{name}.parquet", inputs, recorded, compute, **kw)
            seconds[name] = round(time.perf_counter() - started, 3)
            paths[name] = str(out_dir / f"{name}.parquet")
            steps[name] = {"computed": update.computed, "reused": update.reused, "dropped": update.dropped}
            return update.table

        started = time.perf_counter()
        corpus = scan_corpus(source, previous=_previous_scan(out_dir / "images.parquet"))
        with locked_output(out_dir / "images.parquet"):
            paths["images"] = str(write_parquet(corpus, out_dir / "images.parquet"))
        seconds["images"] = round(time.perf_counter() - started, 3)
        captions = step(
            "captions",
            [corpus],
            {"model": model_ids["captioner"], "dtype": dtype, "max_new_tokens": settings.max_new_tokens},
            lambda images: caption_corpus(images, captioner, batch_size=settings.caption_batch_size),
        )
        segments = step(
            "segments",
            [corpus],
            {
                "model": model_ids["segmenter"],
                "dtype": dtype,
                "thresholds": thresholds,
            },
            lambda images: segment_corpus(
                images, segmenter, out_dir / "segments", batch_size=settings.segment_batch_size
            ),
            temp_dirs=[out_dir / "segments"],
        )
        phrases = step(
            "phrases",
            [captions],
            {"spacy": profile.spacy},
            lambda rows: phrase_corpus(rows, spacy_model=profile.spacy, batch_size=settings.phrase_batch_size),
        )
        matches = step(
            "matches",
            [corpus, segments, phrases],
            {
                "models": [model_ids["matcher_clip"], model_ids["sbert"]],
                "dtype": dtype,
                "threshold": settings.match_threshold,
                "max_subjects": settings.max_subjects,
            },
            lambda *tables: match_corpus(
                *tables, matcher, threshold=settings.match_threshold, max_subjects=settings.max_subjects
            ),
        )
        started = time.perf_counter()
        stats = write_shards(
            corpus,
            phrases,
            segments,
            matches,
            out_dir / "shards",
            samples_per_shard=settings.samples_per_shard,
            val_fraction=settings.val_fraction,
            val_max=settings.val_max,
            models=model_ids,
            rebuild=settings.rebuild,
        )
        seconds["shards"] = round(time.perf_counter() - started, 3)
        stats["paths"].update(paths)
        stats["seconds"] = seconds
        stats["steps"] = steps
        write_json(stats, out_dir / "build_stats.json")
        return stats


def _previous_scan(path: Path) -> pa.Table | None:
    """The corpus table of an earlier build, if there is a readable one."""
    try:
        return read_parquet(path)
    except (OSError, pa.ArrowException):
        return None


def _once(factory: Callable[[], Any]) -> Callable[[], Any]:
    """A factory that builds its model on the first call and returns the same one afterwards."""
    return lru_cache(maxsize=1)(factory)
