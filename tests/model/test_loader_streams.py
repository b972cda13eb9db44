"""The training loader split across ranks × DataLoader workers: exactly once, no foreign decode, exact resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import fc_pipeline.data.shards as shards
from fc_pipeline.data.shards import shard_urls
from fc_pipeline.data.synthetic import write_synthetic_shards
from fc_pipeline.training.samples import (
    DataPosition,
    SamplingConfig,
    TrainingSamples,
    collate_samples,
    data_state,
    read_data_state,
)
from fc_pipeline.training.train import train

CONFIG = SamplingConfig(resolution=32)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """12 samples in 6 shards of 2."""
    directory = tmp_path_factory.mktemp("many")
    write_synthetic_shards(directory, n_samples=12, per_shard=2, size=(48, 40))
    return directory


@pytest.fixture
def decoded(monkeypatch):
    """The ids each call of ``decode_sample`` decoded."""
    seen: list[str] = []
    real = shards.decode_sample

    def counting(raw):
        seen.append(raw["__key__"])
        return real(raw)

    monkeypatch.setattr(shards, "decode_sample", counting)
    return seen


def _as_worker(monkeypatch, workers: int, worker: int) -> None:
    info = SimpleNamespace(num_workers=workers, id=worker)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)


def _epoch(dataset: TrainingSamples, epoch: int = 0) -> list[dict]:
    """The samples of one epoch of one stream (the stream runs on into the next epoch)."""
    out = []
    for sample in dataset:
        if sample["position"].epoch > epoch:
            return out
        out.append(sample)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("world_size,workers", [(1, 1), (2, 1), (3, 2), (2, 3), (4, 2), (8, 2)])
def test_every_sample_exactly_once_per_epoch_and_no_foreign_decode(
    many_shards, tokenizer, monkeypatch, decoded, world_size, workers
):
    urls = shard_urls(many_shards, "train")
    ids_by_stream = {}
    for rank in range(world_size):
        for worker in range(workers):
            _as_worker(monkeypatch, workers, worker)
            decoded.clear()
            dataset = TrainingSamples(urls, tokenizer, CONFIG, seed=5, rank=rank, world_size=world_size)
            samples = _epoch(dataset)
            ids = [s["id"] for s in samples]
            stream = rank * workers + worker
            assert {s["stream"] for s in samples} == {stream}
            # the stream decoded its own samples and, to see the next epoch begin, one more
            assert decoded[: len(ids)] == ids and len(decoded) == len(ids) + 1
            ids_by_stream[stream] = ids
    every = [i for ids in ids_by_stream.values() for i in ids]
    streams = world_size * workers
    assert len(set(every)) == 12  # every sample is used in the epoch
    if streams <= 12:
        assert len(every) == 12  # ... exactly once
    else:  # more streams than samples: each stream gets one, some samples twice
        assert [len(ids) for ids in ids_by_stream.values()] == [1] * streams
    if streams <= 6:  # whole shards per stream (6 shards of 2)
        assert all(len(ids) % 2 == 0 for ids in ids_by_stream.values())


def test_fewer_samples_than_streams_still_trains_every_stream(tmp_path, tokenizer):
    write_synthetic_shards(tmp_path, n_samples=5, per_shard=5, size=(48, 40))
    urls = shard_urls(tmp_path, "train")
    seen = set()
    for rank in range(16):
        stream = iter(TrainingSamples(urls, tokenizer, CONFIG, rank=rank, world_size=16))
        first, second, third = next(stream), next(stream), next(stream)  # three epochs, no error
        assert [first["position"].epoch, second["position"].epoch, third["position"].epoch] == [0, 1, 2]
        assert first["id"] == second["id"]
        seen.add(first["id"])
    assert len(seen) == 5  # each of the 5 samples is used; streams 5..15 repeat them


def test_resume_is_exact_with_several_dataloader_workers(many_shards, tokenizer):
    urls = shard_urls(many_shards, "train")

    def batches(n, **kwargs):
        dataset = TrainingSamples(urls, tokenizer, CONFIG, seed=1, rank=1, world_size=2, **kwargs)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_samples)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out

    full = batches(7)
    assert len({tuple(b["stream"]) for b in full}) == 2  # both workers delivered, in turns
    positions, phase = {}, 0
    for batch in full[:3]:  # a run that stopped after three batches
        positions[batch["stream"][-1]] = batch["position"][-1]
        phase = (phase + 1) % 2
    state = json.loads(json.dumps({"data": data_state(positions, phase)}))
    start, phase = read_data_state(state)
    resumed = batches(4, start=start, phase=phase)
    assert [b["id"] for b in resumed] == [b["id"] for b in full[3:]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(resumed, full[3:]))
    assert read_data_state({"position": DataPosition(0, 1, 2).as_dict()}) == ({0: DataPosition(0, 1, 2)}, 0)


def test_training_with_dataloader_workers_resumes_to_the_same_losses(many_shards, tmp_path):
    from fc_pipeline.training.train import TrainConfig

    def config(out, **overrides):
        options = dict(resolution=32, train_batch_size=2, max_steps=3, checkpoint_every=2, progress=False)
        return TrainConfig.tiny(str(many_shards), str(out), num_workers=2, **{**options, **overrides})

    full = train(config(tmp_path / "full"))
    train(config(tmp_path / "resumed", max_steps=2))
    resumed = train(config(tmp_path / "resumed"))
    assert resumed.resumed_from == 2
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-5)
    saved = json.loads((resumed.checkpoint / "training_state" / "trainer_state.json").read_text())
    assert saved["data"]["phase"] == 1 and set(saved["data"]["positions"]) == {"0", "1"}
