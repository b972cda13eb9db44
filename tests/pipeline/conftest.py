"""Fixtures of the pipeline tests: tiny components, the two pipelines over them, reference photos."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline

from fc_pipeline.model.components import load_components
from fc_pipeline.pipeline import FastComposerPipeline


@pytest.fixture(scope="session")
def components():
    """Tiny random components, shared read-only by the tests of this folder."""
    return load_components("tiny")


@pytest.fixture(scope="session")
def make_fastcomposer(components):
    """``FastComposerPipeline`` over the tiny components, optionally with another scheduler."""

    def make(scheduler=None) -> FastComposerPipeline:
        pipe = FastComposerPipeline.from_components({**components, "scheduler": scheduler or components["scheduler"]})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def make_stable_diffusion(components):
    """``StableDiffusionPipeline`` over the same SD components (no safety checker)."""

    def make(scheduler=None) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            unet=components["unet"],
            scheduler=scheduler or components["scheduler"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def pipe(make_fastcomposer) -> FastComposerPipeline:
    return make_fastcomposer()


@pytest.fixture(scope="session")
def subject_paths(faces_dir):
    """Two reference photos: a man and a woman."""
    return [faces_dir / "subjects" / "paul_rudd" / "1.jpg", faces_dir / "subjects" / "kate_siegel" / "1.jpg"]
