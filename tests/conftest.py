"""Session-wide test settings: nothing may reach a model hub."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
FACES_DIR = REPO_ROOT.parent / "shared" / "testdata" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """Real face photos shared by the team (../shared/testdata/faces)."""
    if not FACES_DIR.exists():
        pytest.fail(f"test photos missing: {FACES_DIR} (clone with ../shared beside the repo)")
    return FACES_DIR


@pytest.fixture(autouse=True)
def no_model_store(monkeypatch):
    """Each test starts without ``$FC_PIPELINE_MODELS``; one that sets it (``fc-pipeline --models``
    exports it for the training subprocess) does not leak it into the next test."""
    monkeypatch.delenv("FC_PIPELINE_MODELS", raising=False)
