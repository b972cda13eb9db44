"""Checkpoints: the inference scheduler they ship, scheduler swaps, safetensors only, the model card."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, PNDMScheduler
from safetensors.torch import load_file

from fc_pipeline.checkpoints import UnsafeCheckpointError, convert_to_safetensors
from fc_pipeline.checkpoints import main as convert_main
from fc_pipeline.cli import main
from fc_pipeline.evaluation.runner import EvaluationConfig
from fc_pipeline.model.components import load_components
from fc_pipeline.pipeline import FastComposerPipeline
from fc_pipeline.schedulers import make_scheduler, with_scheduler
from fc_pipeline.settings import SettingError
from fc_pipeline.training.train import TrainConfig, _save_checkpoint

TEXT = "a man and a woman on the beach"
CALL = dict(num_inference_steps=3, height=32, width=32, guidance_scale=5.0, output_type="np")


def seeded() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    pipe.save_pretrained(path)
    return path


# --- the inference scheduler -----------------------------------------------------------------------
def test_training_checkpoint_ships_sd15_pndm_and_a_model_card(components, tmp_path):
    config = TrainConfig.tiny(shards=str(tmp_path / "data"), output_dir=str(tmp_path / "run"))
    state = {"step": 3, "config": dataclasses.asdict(config)}
    optimizer = torch.optim.AdamW(components["fuser"].parameters())
    checkpoint = _save_checkpoint(Accelerator(cpu=True), dict(components), optimizer, tmp_path, 3, state, keep=1)

    saved = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PNDMScheduler"
    assert (saved["skip_prk_steps"], saved["steps_offset"], saved["set_alpha_to_one"]) == (True, 1, False)
    assert json.loads((checkpoint / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert isinstance(FastComposerPipeline.from_pretrained(checkpoint).scheduler, PNDMScheduler)

    training = load_components("tiny", pretrained=checkpoint)["scheduler"]  # the training noise stays DDPM's
    assert isinstance(training, DDPMScheduler)
    assert torch.equal(training.alphas_cumprod, components["scheduler"].alphas_cumprod)

    card = (checkpoint / "README.md").read_text()
    assert "library_name: diffusers" in card and "tiny random" in card
    assert "| steps | 3 |" in card and "| samples seen | 12 |" in card and "PNDMScheduler" in card
    assert "## Intended use" in card and "## Limitations" in card and "Not evaluated yet" in card


@pytest.mark.parametrize("name", ["pndm", "euler_a", "unipc", "lms", "dpm", "DDIMScheduler"])
def test_scheduler_swap_matches_stable_diffusion(components, make_fastcomposer, make_stable_diffusion, name):
    ours = with_scheduler(make_fastcomposer(), name)
    assert type(ours.scheduler) is type(make_scheduler(name, components["scheduler"].config))
    theirs = make_stable_diffusion(make_scheduler(name, components["scheduler"].config))
    a, b = ours(TEXT, generator=seeded(), **CALL).images, theirs(TEXT, generator=seeded(), **CALL).images
    assert np.abs(a - b).max() == 0.0


def test_unknown_scheduler_is_named(pipe, saved, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown scheduler 'nope'; choose one of pndm, ddim"):
        with_scheduler(pipe, "nope")
    with pytest.raises(SettingError, match="scheduler"):
        EvaluationConfig(scheduler="nope")
    code = main(["generate", "--checkpoint", str(saved), "--prompt", "a dog", "--scheduler", "nope"])
    assert code == 2 and "unknown scheduler 'nope'" in capsys.readouterr().err


# --- safetensors only ----------------------------------------------------------------------------------
class WritesAFile:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_before_unpickling(saved, tmp_path, capsys):
    checkpoint = tmp_path / "evil"
    shutil.copytree(saved, checkpoint)
    marker = tmp_path / "pwned"
    (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (checkpoint / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesAFile(marker)))

    with pytest.raises(UnsafeCheckpointError, match=r"unet/diffusion_pytorch_model\.bin: pickled weights"):
        FastComposerPipeline.from_pretrained(checkpoint)
    with pytest.raises(UnsafeCheckpointError, match="python -m fc_pipeline.checkpoints"):
        load_components("tiny", pretrained=checkpoint)
    out = tmp_path / "o.png"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a dog", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diffusion_pytorch_model.bin" in err
    assert not marker.exists() and not out.exists()


def test_a_trusted_pickled_checkpoint_converts(saved, tmp_path):
    checkpoint = tmp_path / "old"
    shutil.copytree(saved, checkpoint)
    weights = checkpoint / "fuser" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), checkpoint / "fuser" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert convert_main([str(checkpoint), str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "fuser" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "new").rglob("*.bin"))
    converted = FastComposerPipeline.from_pretrained(tmp_path / "new")
    original = FastComposerPipeline.from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(converted.fuser.parameters(), original.fuser.parameters()))
    with pytest.raises(FileExistsError):
        convert_to_safetensors(checkpoint, tmp_path / "new")


def test_pickle_serialisation_is_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "x", safe_serialization=False)


# --- model card and hub upload (offline) -----------------------------------------------------------------
def test_model_card_round_trip_and_push_to_hub(pipe, tmp_path, monkeypatch):
    card_data = {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "training_data": "FFHQ-wild, 70k images",
        "metrics": {"identity (single)": "51.4 %", "prompt consistency (single)": "24.3 %"},
    }
    copy = FastComposerPipeline.from_components({**pipe.components})
    copy.save_pretrained(tmp_path / "ckpt", card_data=card_data)
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card
    assert "| identity (single) | 51.4 % |" in card and "FFHQ-wild, 70k images" in card

    loaded = FastComposerPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.card_data == card_data
    uploads = {}

    def upload(self, folder, repo_id, **kwargs):
        uploads[repo_id] = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))
        uploads["card"] = (Path(folder) / "README.md").read_text()

    monkeypatch.setattr("huggingface_hub.create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(FastComposerPipeline, "_upload_folder", upload)
    loaded.push_to_hub("me/fastcomposer")
    files = uploads["me/fastcomposer"]
    assert "README.md" in files and "model_index.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert "| identity (single) | 51.4 % |" in uploads["card"], "the card survives a reload and the upload"


def test_loaders_take_dtype_without_deprecations(saved, recwarn):
    parts = load_components("tiny", pretrained=saved, torch_dtype=torch.bfloat16)
    assert parts["unet"].dtype == parts["vae"].dtype == parts["fuser"].dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == parts["image_encoder"].dtype == torch.bfloat16
    pipe = FastComposerPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.fuser.dtype == torch.bfloat16
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]
