import dataclasses
import json
import shutil

import pytest
import torch

from fc_pipeline.model.attention import SubjectAttentionProcessor, install_attention_capture
from fc_pipeline.model.components import load_components, set_trainable
from fc_pipeline.model.objective import compute_losses
from fc_pipeline.profiles import TINY_LOCALIZATION_LAYERS
from fc_pipeline.storage import write_json
from fc_pipeline.training.train import TrainConfig, list_checkpoints, train, train_shard_urls


def _config(shards, out, **overrides):
    options = dict(resolution=32, train_batch_size=2, max_steps=3, checkpoint_every=2, progress=False)
    return TrainConfig.tiny(str(shards), str(out), **{**options, **overrides})


def _batch(synthetic_shards, tokenizer, n=2):
    from fc_pipeline.data.shards import shard_urls
    from fc_pipeline.training.samples import SamplingConfig, TrainingSamples, collate_samples

    config = SamplingConfig(resolution=32, unconditional_prob=0, text_only_prob=0, subject_drop_prob=0)
    stream = iter(TrainingSamples(shard_urls(synthetic_shards, "train"), tokenizer, config))
    return collate_samples([next(stream) for _ in range(n)])


def test_shards_of_several_datasets_join_in_the_given_order(synthetic_shards, tmp_path):
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    shutil.copy(synthetic_shards / "train" / "00001.tar", other / "train" / "00000.tar")
    config = TrainConfig.tiny([str(other), str(synthetic_shards)], str(tmp_path / "run"))
    loaded = TrainConfig.from_json(write_json(dataclasses.asdict(config), tmp_path / "cfg.json"))
    assert loaded == config and loaded.shards == [str(other), str(synthetic_shards)]
    train_dir = synthetic_shards / "train"
    assert train_shard_urls(loaded.shards) == [
        str(other / "train" / "00000.tar"),
        str(train_dir / "00000.tar"),
        str(train_dir / "00001.tar"),
    ]
    assert train_shard_urls(str(synthetic_shards)) == [str(train_dir / "00000.tar"), str(train_dir / "00001.tar")]
    assert train_shard_urls(str(train_dir / "00001.tar")) == [str(train_dir / "00001.tar")]
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no training shards under .*/empty/train, .*/missing/train") as error:
        train(
            TrainConfig.tiny(
                [str(synthetic_shards), str(tmp_path / "empty"), str(tmp_path / "missing")], str(tmp_path / "run")
            )
        )
    assert str(synthetic_shards) not in str(error.value)
    with pytest.raises(ValueError, match="no training dataset"):
        train_shard_urls([])


def test_kill_and_resume_continues_from_the_saved_step(synthetic_shards, tmp_path):
    full = train(_config(synthetic_shards, tmp_path / "full"))
    assert full.steps == 3 and [c.name for c in list_checkpoints(tmp_path / "full")] == [
        "checkpoint-0000002",
        "checkpoint-0000003",
    ]
    # a run stopped after its step-2 checkpoint, then relaunched with the full budget
    stopped = train(_config(synthetic_shards, tmp_path / "resumed", max_steps=2, keep_checkpoints=1))
    assert stopped.steps == 2
    resumed = train(_config(synthetic_shards, tmp_path / "resumed", keep_checkpoints=1))
    assert resumed.resumed_from == 2 and resumed.steps == 3
    assert [c.name for c in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-0000003"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(full.history, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["l_loc"] == pytest.approx(
            a["l_loc"], rel=1e-4, abs=1e-8
        )
    a = load_components("tiny", pretrained=full.checkpoint)
    b = load_components("tiny", pretrained=resumed.checkpoint)
    for name in ("unet", "fuser", "image_encoder"):
        for pa, pb in zip(a[name].parameters(), b[name].parameters()):
            assert torch.allclose(pa, pb, atol=1e-6), name

    # frozen parameters are bit-identical after training, trainable ones moved
    fresh = load_components("tiny")
    for name in ("vae", "text_encoder"):
        assert all(torch.equal(p, q) for p, q in zip(fresh[name].parameters(), a[name].parameters())), name
    vision, trained_vision = fresh["image_encoder"], a["image_encoder"]
    frozen = [vision.vision_model.embeddings, *vision.vision_model.encoder.layers[:-2], vision.visual_projection]
    trained_frozen = [
        trained_vision.vision_model.embeddings,
        *trained_vision.vision_model.encoder.layers[:-2],
        trained_vision.visual_projection,
    ]
    for m, n in zip(frozen, trained_frozen):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(fresh["unet"].parameters(), a["unet"].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(fresh["fuser"].parameters(), a["fuser"].parameters()))
    last, trained_last = vision.vision_model.encoder.layers[-1], trained_vision.vision_model.encoder.layers[-1]
    assert not all(torch.equal(p, q) for p, q in zip(last.parameters(), trained_last.parameters()))

    # the checkpoint is safetensors only and loads in the inference pipeline
    files = [p for p in full.checkpoint.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pkl", ".pt", ".pth", ".ckpt")]
    from fc_pipeline.pipeline import FastComposerPipeline

    pipeline = FastComposerPipeline.from_pretrained(full.checkpoint)
    assert type(pipeline.fuser).__name__ == "SubjectFuser"
    summary = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["checkpoint"] == str(full.checkpoint)
    # a finished run resumes to nothing new
    again = train(_config(synthetic_shards, tmp_path / "full"))
    assert again.steps == 3 and again.checkpoint == full.checkpoint


def test_overfitting_one_batch_lowers_both_losses(synthetic_shards, tokenizer):
    components = load_components("tiny")
    batch = _batch(synthetic_shards, tokenizer)
    capture = install_attention_capture(components["unet"], TINY_LOCALIZATION_LAYERS)
    optimizer = torch.optim.AdamW(set_trainable(components), lr=2e-3)
    history = []
    for _ in range(30):
        torch.manual_seed(0)  # the same noise and timesteps every step: a fixed objective
        losses = compute_losses(components, batch, capture, localization_weight=1.0, mask_loss_prob=0.5)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((losses["l_noise"].item(), losses["l_loc"].item()))
    (noise_start, loc_start), (noise_end, loc_end) = history[0], history[-1]
    assert noise_end < 0.5 * noise_start
    assert loc_end < loc_start - 0.005


def test_lambda_zero_turns_the_localization_term_off(synthetic_shards, tokenizer):
    batch = _batch(synthetic_shards, tokenizer)

    def gradients(weight, with_capture):
        components = load_components("tiny")
        set_trainable(components)
        capture = install_attention_capture(components["unet"], TINY_LOCALIZATION_LAYERS) if with_capture else None
        torch.manual_seed(0)
        losses = compute_losses(components, batch, capture, localization_weight=weight)
        losses["loss"].backward()
        if capture is not None:
            assert capture.maps == {}
        return losses, [p.grad.clone() for p in components["unet"].parameters()]

    off, grads_off = gradients(0.0, with_capture=True)
    plain, grads_plain = gradients(0.0, with_capture=False)
    on, grads_on = gradients(1.0, with_capture=True)
    assert off["l_loc"].item() == 0.0 and torch.equal(off["loss"], off["l_noise"])
    assert on["l_loc"].item() != 0.0 and on["loss"].item() == pytest.approx(
        on["l_noise"].item() + on["l_loc"].item(), rel=1e-6
    )
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_off, grads_plain))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_on, grads_plain))


def test_training_with_lambda_zero_keeps_sdpa_everywhere(synthetic_shards, tmp_path, monkeypatch):
    import fc_pipeline.training.train as training

    installed = []
    monkeypatch.setattr("fc_pipeline.model.attention.install_attention_capture", lambda *a, **k: installed.append(a))
    result = training.train(_config(synthetic_shards, tmp_path, max_steps=1, localization_weight=0.0))
    assert installed == [] and result.l_loc == 0.0 and result.loss == result.l_noise
    unet = load_components("tiny", pretrained=result.checkpoint)["unet"]
    assert not any(isinstance(p, SubjectAttentionProcessor) for p in unet.attn_processors.values())


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(synthetic_shards, tokenizer):
    batch = _batch(synthetic_shards, tokenizer)

    def run(checkpointing):
        components = load_components("tiny")
        set_trainable(components)
        components["unet"].train()
        if checkpointing:
            components["unet"].enable_gradient_checkpointing()
        capture = install_attention_capture(components["unet"], TINY_LOCALIZATION_LAYERS)
        torch.manual_seed(0)
        losses = compute_losses(components, batch, capture, localization_weight=1.0)
        losses["loss"].backward()
        return losses, [p.grad for p in components["unet"].parameters()]

    (plain, plain_grads), (checkpointed, checkpointed_grads) = run(False), run(True)
    assert checkpointed["l_loc"].item() == pytest.approx(plain["l_loc"].item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, checkpointed_grads))
