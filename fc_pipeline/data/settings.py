"""The options of the dataset chain, declared once.

``build_dataset`` takes a :class:`DatasetSettings`; the ``build-dataset`` flags and the Dagster
configs of the dataset assets (and the model resources' post-processing settings) derive from
these fields. Values are checked when the object is built, before any image is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from fc_pipeline.settings import setting, validate


@dataclass(frozen=True)
class DatasetSettings:
    """Batch sizes, model post-processing, matching and sharding of one dataset build."""

    caption_batch_size: int = setting(8, "Images per captioner forward pass.", min=1)
    max_new_tokens: int = setting(30, "Caption length limit in tokens.", min=1)
    segment_batch_size: int = setting(4, "Images per segmenter forward pass.", min=1)
    segment_threshold: float = setting(0.8, "Mask2Former class score threshold.", min=0, max=1)
    mask_threshold: float = setting(0.5, "Mask2Former mask probability threshold.", min=0, max=1)
    overlap_mask_area_threshold: float = setting(
        0.8, "Mask2Former: share of a mask that must survive overlaps.", min=0, max=1
    )
    phrase_batch_size: int = setting(64, "Captions per spaCy batch.", min=1)
    match_threshold: float | None = setting(
        None, "Minimum CLIP×SBERT score of a phrase–segment pair; empty: the profile's.", min=-1, max=1
    )
    max_subjects: int = setting(4, "At most this many subjects per image.", paper=4, min=1)
    samples_per_shard: int = setting(1000, "Samples per webdataset tar.", min=1)
    val_fraction: float = setting(
        0.05, "Share of images held out for validation.", paper="1000 of FFHQ-wild's 70k", min=0, max=1
    )
    val_max: int = setting(1000, "At most this many validation images.", paper=1000, min=0)
    rebuild: bool = setting(False, "Rewrite every shard (otherwise new images only go into new shards).")

    def __post_init__(self):
        validate(self)
