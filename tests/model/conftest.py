"""Fixtures of the model tests: tiny components and synthetic training shards."""

from __future__ import annotations

import pytest
import torch

from fc_pipeline.data.synthetic import write_synthetic_shards
from fc_pipeline.profiles import clip_tokenizer, get_profile


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a shared 2-core machine spin
    (measured: 0.3 s vs 1–12 s per tiny training step while other processes run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return clip_tokenizer(get_profile("tiny"))


@pytest.fixture
def components():
    """Fresh tiny components (seeded: identical weights on every call)."""
    from fc_pipeline.model.components import load_components

    return load_components("tiny")


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A tiny dataset directory with ``train/00000.tar`` and ``train/00001.tar`` (8 samples)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))
