"""Dagster resources: where a corpus's files live, and one resource per model.

A model resource builds its model lazily, the first time a step really needs it, and keeps it
for the life of the process (a module-level cache keyed by the resource's settings), so several
assets or re-executions in one process never load the same weights twice.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import dagster as dg

from fc_pipeline.profiles import ModelProfile, get_profile

from .instance import GPU_POOL  # noqa: F401  (the pool of every step that needs the accelerator)

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """``$FC_PIPELINE_DATA``, else ``<repo>/data``."""
    return Path(os.environ.get("FC_PIPELINE_DATA") or REPO_ROOT / "data")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is kept."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@cache
def _load_once(factory: type, profile: ModelProfile, **settings: Any) -> Any:
    return factory(profile, **settings)


class DatasetStore(dg.ConfigurableResource):
    """Where corpora live: raw images under ``<data_root>/corpora/<corpus>`` (a folder, or a
    ``<corpus>.jsonl``/``.parquet`` manifest), derived files of a corpus under
    ``<data_root>/datasets/<corpus>/``; training runs under ``<data_root>/checkpoints``.

    ``data_root`` empty means ``$FC_PIPELINE_DATA`` or ``<repo>/data``. The corpus name is the
    asset partition key (see :mod:`assets.partitions`).
    """

    data_root: str = ""

    @property
    def root(self) -> Path:
        return Path(self.data_root) if self.data_root else default_data_root()

    @property
    def corpora_dir(self) -> Path:
        """The folder the corpus sensor watches for new corpora."""
        return self.root / "corpora"

    def corpora(self) -> dict[str, Path]:
        """``{name: folder or manifest}`` of the corpora present under :attr:`corpora_dir`."""
        from fc_pipeline.data.corpora import discover_corpora

        return discover_corpora(self.corpora_dir)

    def source(self, corpus: str) -> Path:
        """The corpus's raw images: its folder or manifest (the folder path when neither exists yet)."""
        return self.corpora().get(corpus, self.corpora_dir / corpus)

    def dataset_dir(self, corpus: str) -> Path:
        """Where the intermediate parquet files, segment maps and shards of the corpus go."""
        return self.root / "datasets" / corpus

    @property
    def checkpoints_dir(self) -> Path:
        """Training runs (over all corpora): ``<data_root>/checkpoints/run-<id>``."""
        return self.root / "checkpoints"

    def path(self, corpus: str, name: str) -> Path:
        """A file or folder of the corpus's dataset dir (``images.parquet``, ``shards``, ...)."""
        return self.dataset_dir(corpus) / name


class CaptionerResource(dg.ConfigurableResource):
    """BLIP-2 captioner of a model profile (``model`` overrides the profile's checkpoint)."""

    profile: str = "tiny"
    model: str = ""
    device: str = "auto"
    dtype: str = ""
    max_new_tokens: int = 30

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(self.profile, captioner=self.model or None)

    def model_ids(self) -> dict[str, str]:
        """Which checkpoint this resource loads (for provenance; nothing is loaded)."""
        return {"captioner": self.model_profile.captioner}

    def load(self):
        """The captioner, built on first use and shared by the whole process."""
        from fc_pipeline.data.captioning import Captioner

        return _load_once(
            Captioner,
            self.model_profile,
            device=resolve_device(self.device),
            dtype=self.dtype or None,
            max_new_tokens=self.max_new_tokens,
        )


class SegmenterResource(dg.ConfigurableResource):
    """Mask2Former panoptic segmenter of a model profile, with its post-processing thresholds."""

    profile: str = "tiny"
    model: str = ""
    device: str = "auto"
    threshold: float = 0.8
    mask_threshold: float = 0.5
    overlap_mask_area_threshold: float = 0.8

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(self.profile, segmenter=self.model or None)

    def model_ids(self) -> dict[str, str]:
        """Which checkpoint this resource loads (for provenance; nothing is loaded)."""
        return {"segmenter": self.model_profile.segmenter}

    def load(self):
        """The segmenter, built on first use and shared by the whole process."""
        from fc_pipeline.data.segmentation import Segmenter

        return _load_once(
            Segmenter,
            self.model_profile,
            device=resolve_device(self.device),
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_mask_area_threshold,
        )


class MatcherResource(dg.ConfigurableResource):
    """OpenCLIP × SBERT phrase–segment scorer of a model profile."""

    profile: str = "tiny"
    clip_model: str = ""
    clip_pretrained: str = ""
    sbert: str = ""
    device: str = "auto"

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(
            self.profile,
            matcher_clip=self.clip_model or None,
            matcher_clip_pretrained=self.clip_pretrained or None,
            sbert=self.sbert or None,
        )

    def model_ids(self) -> dict[str, str]:
        """Which checkpoints this resource loads (for provenance; nothing is loaded)."""
        profile = self.model_profile
        return {"matcher_clip": f"{profile.matcher_clip}/{profile.matcher_clip_pretrained}", "sbert": profile.sbert}

    def load(self):
        """The subject matcher, built on first use and shared by the whole process."""
        from fc_pipeline.data.matching import SubjectMatcher

        return _load_once(SubjectMatcher, self.model_profile, device=resolve_device(self.device))


class EvaluatorResource(dg.ConfigurableResource):
    """Evaluation models of a profile: MTCNN + FaceNet and the prompt-consistency CLIP (owner: evaluation)."""

    profile: str = "tiny"
    facenet: str = ""
    prompt_clip: str = ""
    device: str = "auto"

    def face_scorer(self):
        """MTCNN + FaceNet, built on first use and shared by the whole process."""
        from fc_pipeline.evaluation.faces import FaceScorer

        return _load_once(
            FaceScorer, get_profile(self.profile, facenet=self.facenet or None), device=resolve_device(self.device)
        )

    def prompt_scorer(self):
        """The CLIP image–text scorer, built on first use and shared by the whole process."""
        from fc_pipeline.evaluation.prompt_consistency import PromptConsistency

        profile = get_profile(self.profile, prompt_clip=self.prompt_clip or None)
        return _load_once(PromptConsistency, profile, device=resolve_device(self.device))


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location, by key. ``FC_PIPELINE_PROFILE`` picks the model profile."""
    profile = os.environ.get("FC_PIPELINE_PROFILE", "tiny")
    return {
        "store": DatasetStore(),
        "captioner": CaptionerResource(profile=profile),
        "segmenter": SegmenterResource(profile=profile),
        "matcher": MatcherResource(profile=profile),
        "evaluator": EvaluatorResource(profile=profile),
        "pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO_ROOT)),  # launches training
    }
