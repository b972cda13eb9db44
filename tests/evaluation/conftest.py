"""Shared evaluation fixtures: the real face models, the tiny scorers and a tiny pipeline, built once."""

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def face_scorer():
    from fc_pipeline.evaluation.faces import default_face_scorer

    return default_face_scorer("tiny", "cpu")


@pytest.fixture(scope="session")
def prompt_scorer():
    from fc_pipeline.evaluation.prompt_consistency import default_prompt_scorer

    return default_prompt_scorer("tiny", "cpu")


@pytest.fixture(scope="session")
def subject_photos(faces_dir: Path) -> dict[str, Image.Image]:
    folders = sorted(p for p in (faces_dir / "subjects").iterdir() if p.is_dir())
    return {p.name: Image.open(p / "1.jpg").convert("RGB") for p in folders}


@pytest.fixture(scope="session")
def subject_faces(face_scorer, subject_photos):
    return {name: face_scorer.faces(photo) for name, photo in subject_photos.items()}


@pytest.fixture(scope="session")
def tiny_pipeline():
    from fc_pipeline.model.components import load_components
    from fc_pipeline.pipeline import FastComposerPipeline

    pipe = FastComposerPipeline.from_components(load_components("tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_pipeline, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-ckpt"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def demo_subjects(tmp_path_factory) -> Path:
    from fc_pipeline.evaluation.subjects import write_demo_subjects

    return write_demo_subjects(tmp_path_factory.mktemp("demo") / "subjects")
