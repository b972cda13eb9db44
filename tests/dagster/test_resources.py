"""Model resources lend a model to one step: built when needed, released after, half precision on CUDA."""

from __future__ import annotations

import gc
import weakref

import dagster as dg
import pytest
import torch

import assets
from assets.resources import CaptionerResource, DatasetStore, MatcherResource, ModelResource, SegmenterResource
from fc_pipeline.settings import resolve_dtype

from .conftest import CORPUS, DATASET_ASSETS, SMALL_CORPUS


def test_dtype_defaults_to_half_precision_on_cuda_only(monkeypatch):
    assert resolve_dtype("auto", "cpu") == resolve_dtype(None, "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("", "cuda:1") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("float32", "cuda") == "float32"  # an explicit choice is kept
    for resource in (CaptionerResource(), SegmenterResource(), MatcherResource()):
        assert (resource.dtype, resource.torch_dtype_name) == ("auto", "float32")  # no GPU here


def test_a_model_lives_only_inside_its_block():
    resource = CaptionerResource(max_new_tokens=4)
    with resource.loaded() as load:
        model = load()
        assert load() is model  # built once per block
        alive = weakref.ref(model)
        del model
        assert alive() is not None  # the block holds it
    gc.collect()
    assert alive() is None


def test_dataset_steps_release_their_models(tmp_path, monkeypatch):
    built: dict[str, list[weakref.ref]] = {}
    for cls in (CaptionerResource, SegmenterResource, MatcherResource):
        real = cls.build

        def build(self, real=real, name=cls.__name__):
            model = real(self)
            built.setdefault(name, []).append(weakref.ref(model))
            return model

        monkeypatch.setattr(cls, "build", build)
    resources = {**assets.defs.resources, "store": DatasetStore(data_root=str(tmp_path))}
    baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        result = dg.materialize(
            DATASET_ASSETS[:5],
            resources=resources,
            instance=instance,
            partition_key=CORPUS,
            run_config={"ops": {"corpus_images": {"config": {"demo_images": SMALL_CORPUS}}}},
        )
    assert result.success
    gc.collect()
    # every model was built once, by its own step, and nothing holds it after the run
    assert sorted(built) == ["CaptionerResource", "MatcherResource", "SegmenterResource"]
    assert all(len(refs) == 1 and refs[0]() is None for refs in built.values()), built
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() == baseline


def test_model_resources_share_one_lifecycle():
    assert all(issubclass(cls, ModelResource) for cls in (CaptionerResource, SegmenterResource, MatcherResource))
    with pytest.raises(NotImplementedError), ModelResource().loaded() as load:
        load()
