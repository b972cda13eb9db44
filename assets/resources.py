"""Dagster resources: where a corpus's files live, and one resource per model.

A model resource lends its model to one step: ``with resource.loaded() as load:`` gives a
factory that builds the model the first time the step really needs it (an all-cached step loads
nothing), and on leaving the block the model is dropped and the CUDA cache emptied, so no step
holds accelerator memory that the next one (e.g. the training subprocess) needs. On CUDA models
load in half precision by default (bfloat16 where supported), on CPU in float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from fc_pipeline.data.chunks import MAX_CHUNKS, check_chunks
from fc_pipeline.data.settings import DatasetSettings
from fc_pipeline.profiles import ModelProfile, get_profile
from fc_pipeline.settings import release_memory, resolve_device, resolve_dtype

from .instance import GPU_POOL  # noqa: F401  (the pool of every step that needs the accelerator)
from .settings import library_field

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNKS_ENV = "FC_PIPELINE_CHUNKS"


def default_data_root() -> Path:
    """``$FC_PIPELINE_DATA``, else ``<repo>/data``."""
    return Path(os.environ.get("FC_PIPELINE_DATA") or REPO_ROOT / "data")


def default_chunks(env: Mapping[str, str] = os.environ) -> int:
    """``$FC_PIPELINE_CHUNKS`` (the deployment's fan-out inside a corpus), else 1."""
    value = env.get(CHUNKS_ENV) or "1"
    try:
        return check_chunks(int(value))
    except ValueError:
        raise ValueError(f"{CHUNKS_ENV} must be an integer from 1 to {MAX_CHUNKS}, not {value!r}") from None


class ModelResource(dg.ConfigurableResource):
    """A model lent to one step (see the module docstring); subclasses say how to :meth:`build` it."""

    profile: str = "tiny"
    models_dir: str = Field(default="", description="Model store of the paper profile; empty: $FC_PIPELINE_MODELS.")
    device: str = Field(default="auto", description="auto: cuda when a GPU is visible, else cpu.")
    dtype: str = Field(default="auto", description="auto: bfloat16 (or float16) on CUDA, float32 on CPU.")

    @property
    def torch_device(self) -> str:
        return resolve_device(self.device)

    @property
    def torch_dtype_name(self) -> str:
        return resolve_dtype(self.dtype, self.torch_device)

    def build(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def loaded(self) -> Iterator[Callable[[], Any]]:
        """A factory of this resource's model for the block: built on first call, released on exit."""
        held: list[Any] = []

        def load() -> Any:
            if not held:
                held.append(self.build())
            return held[0]

        try:
            yield load
        finally:
            held.clear()
            release_memory()


class DatasetStore(dg.ConfigurableResource):
    """Where corpora live: raw images under ``<data_root>/corpora/<corpus>`` (a folder, or a
    ``<corpus>.jsonl``/``.parquet`` manifest), derived files of a corpus under
    ``<data_root>/datasets/<corpus>/``; training runs under ``<data_root>/checkpoints``.

    ``data_root`` empty means ``$FC_PIPELINE_DATA`` or ``<repo>/data``. The corpus name is the
    asset partition key (see :mod:`assets.partitions`). ``chunks`` is how many steps (processes,
    pods, GPUs) the per-image work of one corpus is spread over (:mod:`assets.chunked`); it never
    changes what is written.
    """

    data_root: str = ""
    chunks: int = Field(
        default=1,
        ge=1,
        le=MAX_CHUNKS,
        description="Chunks each per-image dataset step of a corpus runs in, each a step of its own "
        f"(process, pod, GPU); the outputs do not depend on it. Code location default: ${CHUNKS_ENV} or 1.",
    )

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


class CaptionerResource(ModelResource):
    """BLIP-2 captioner of a model profile (``model`` overrides the profile's checkpoint)."""

    model: str = ""
    max_new_tokens: int = library_field(DatasetSettings, "max_new_tokens")

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(self.profile, self.models_dir or None, captioner=self.model or None)

    def model_ids(self) -> dict[str, str]:
        """Which checkpoint this resource loads (for provenance; nothing is loaded)."""
        return {"captioner": self.model_profile.captioner}

    def build(self):
        """The captioner."""
        from fc_pipeline.data.captioning import Captioner

        return Captioner(
            self.model_profile,
            device=self.torch_device,
            dtype=self.torch_dtype_name,
            max_new_tokens=self.max_new_tokens,
        )


class SegmenterResource(ModelResource):
    """Mask2Former panoptic segmenter of a model profile, with its post-processing thresholds."""

    model: str = ""
    threshold: float = library_field(DatasetSettings, "segment_threshold")
    mask_threshold: float = library_field(DatasetSettings, "mask_threshold")
    overlap_mask_area_threshold: float = library_field(DatasetSettings, "overlap_mask_area_threshold")

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(self.profile, self.models_dir or None, segmenter=self.model or None)

    def model_ids(self) -> dict[str, str]:
        """Which checkpoint this resource loads (for provenance; nothing is loaded)."""
        return {"segmenter": self.model_profile.segmenter}

    def build(self):
        """The segmenter."""
        from fc_pipeline.data.segmentation import Segmenter

        return Segmenter(
            self.model_profile,
            device=self.torch_device,
            dtype=self.torch_dtype_name,
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_mask_area_threshold,
        )


class MatcherResource(ModelResource):
    """OpenCLIP × SBERT phrase–segment scorer of a model profile."""

    clip_model: str = ""
    clip_pretrained: str = ""
    sbert: str = ""

    @property
    def model_profile(self) -> ModelProfile:
        return get_profile(
            self.profile,
            self.models_dir or None,
            matcher_clip=self.clip_model or None,
            matcher_clip_pretrained=self.clip_pretrained or None,
            sbert=self.sbert or None,
        )

    def model_ids(self) -> dict[str, str]:
        """Which checkpoints this resource loads (for provenance; nothing is loaded)."""
        profile = self.model_profile
        return {"matcher_clip": f"{profile.matcher_clip}/{profile.matcher_clip_pretrained}", "sbert": profile.sbert}

    def build(self):
        """The subject matcher."""
        from fc_pipeline.data.matching import SubjectMatcher

        return SubjectMatcher(self.model_profile, device=self.torch_device, dtype=self.torch_dtype_name)


class EvaluatorResource(dg.ConfigurableResource):
    """Evaluation models of a profile: MTCNN + FaceNet and the prompt-consistency CLIP (owner: evaluation)."""

    profile: str = "tiny"
    models_dir: str = Field(default="", description="Model store of the paper profile; empty: $FC_PIPELINE_MODELS.")
    facenet: str = ""
    prompt_clip: str = ""
    device: str = "auto"

    def face_scorer(self):
        """MTCNN + FaceNet (the step that asks holds it; it is freed with the step)."""
        from fc_pipeline.evaluation.faces import FaceScorer

        return FaceScorer(
            get_profile(self.profile, self.models_dir or None, facenet=self.facenet or None),
            device=resolve_device(self.device),
        )

    def prompt_scorer(self):
        """The CLIP image–text scorer (the step that asks holds it; it is freed with the step)."""
        from fc_pipeline.evaluation.prompt_consistency import PromptConsistency

        profile = get_profile(self.profile, self.models_dir or None, prompt_clip=self.prompt_clip or None)
        return PromptConsistency(profile, device=resolve_device(self.device))


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location, by key. ``FC_PIPELINE_PROFILE`` picks the model profile,
    ``FC_PIPELINE_CHUNKS`` the fan-out of a corpus's per-image steps."""
    profile = os.environ.get("FC_PIPELINE_PROFILE", "tiny")
    return {
        "store": DatasetStore(chunks=default_chunks()),
        "captioner": CaptionerResource(profile=profile),
        "segmenter": SegmenterResource(profile=profile),
        "matcher": MatcherResource(profile=profile),
        "evaluator": EvaluatorResource(profile=profile),
        "pipes_subprocess_client": dg.PipesSubprocessClient(cwd=str(REPO_ROOT)),  # launches training
    }
