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
    caption_batch_size: int = 8,
    max_new_tokens: int = 30,
    segment_batch_size: int = 4,
    segment_threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    match_threshold: float | None = None,
    max_subjects: int = 4,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.05,
    val_max: int = 1000,
    captioner: Captioner | Callable[[], Captioner] | None = None,
    segmenter: Segmenter | Callable[[], Segmenter] | None = None,
    matcher: SubjectMatcher | Callable[[], SubjectMatcher] | None = None,
) -> dict:
    """Corpus -> captions -> segments -> phrases -> matches -> shards; returns the shard stats
    plus ``paths`` of every intermediate file, ``seconds`` per step and, per model step,
    ``steps[name] = {computed, reused, dropped}`` rows.

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
    profile = get_profile(profile)
    out_dir = Path(out_dir)
    with writer_lock(out_dir, what="dataset build"):
        remove_temp_files(out_dir, ".build_stats.json.")
        captioner = captioner or _once(lambda: Captioner(profile, device, dtype, max_new_tokens))
        segmenter = segmenter or _once(
            lambda: Segmenter(profile, device, segment_threshold, mask_threshold, overlap_mask_area_threshold, dtype)
        )
        matcher = matcher or _once(lambda: SubjectMatcher(profile, device, dtype))
        model_ids = dataset_model_ids(profile)
        seconds: dict[str, float] = {}
        paths: dict[str, str] = {}
        steps: dict[str, dict[str, int]] = {}

        def step(name: str, inputs: list[pa.Table], settings: dict, compute: Callable[..., pa.Table], **kw) -> pa.Table:
            started = time.perf_counter()
            update = update_table(out_dir / f"{name}.parquet", inputs, settings, compute, **kw)
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
            {"model": model_ids["captioner"], "dtype": dtype, "max_new_tokens": max_new_tokens},
            lambda images: caption_corpus(images, captioner, batch_size=caption_batch_size),
        )
        segments = step(
            "segments",
            [corpus],
            {
                "model": model_ids["segmenter"],
                "dtype": dtype,
                "thresholds": [segment_threshold, mask_threshold, overlap_mask_area_threshold],
            },
            lambda images: segment_corpus(images, segmenter, out_dir / "segments", batch_size=segment_batch_size),
            temp_dirs=[out_dir / "segments"],
        )
        phrases = step(
            "phrases",
            [captions],
            {"spacy": profile.spacy},
            lambda rows: phrase_corpus(rows, spacy_model=profile.spacy),
        )
        matches = step(
            "matches",
            [corpus, segments, phrases],
            {
                "models": [model_ids["matcher_clip"], model_ids["sbert"]],
                "dtype": dtype,
                "threshold": match_threshold,
                "max_subjects": max_subjects,
            },
            lambda *tables: match_corpus(*tables, matcher, threshold=match_threshold, max_subjects=max_subjects),
        )
        started = time.perf_counter()
        stats = write_shards(
            corpus,
            phrases,
            segments,
            matches,
            out_dir / "shards",
            samples_per_shard=samples_per_shard,
            val_fraction=val_fraction,
            val_max=val_max,
            models=model_ids,
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
