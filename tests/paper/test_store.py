"""The model store: resolution, check, download and the memory plan (no real weights anywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fc_pipeline import pretrained
from fc_pipeline.cli.main import main
from fc_pipeline.pretrained import GIB, MODELS_ENV, MemoryPlanError, check, plan_step, stored_models
from fc_pipeline.profiles import get_profile

# meta-device parameter counts of the paper's architectures (configs in fc_pipeline/configs/paper)
PAPER_PARAMETERS = {
    "captioner": 7_752_738_304,  # BLIP-2 OPT-6.7b (the OPT head tied to its embedding)
    "segmenter": 215_538_682,  # Mask2Former Swin-L, 133 labels, 200 queries
    "matcher_clip": 986_109_441,  # OpenCLIP ViT-H-14
    "sbert": 109_486_464,  # MPNet base
    "stable_diffusion": 1_066_235_307,  # UNet 859,520,964 + VAE 83,653,863 + CLIP text 123,060,480
    "image_encoder+prompt_clip": 427_616_513,  # CLIP ViT-L/14, both towers
    "facenet": 23_482_624,  # InceptionResnetV1 without its classifier
}


def test_a_store_points_every_paper_model_at_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    profile = get_profile("paper")
    assert profile.offline and profile.models_dir == str(tmp_path)
    assert profile.captioner == str(tmp_path / "Salesforce/blip2-opt-6.7b-coco")
    assert profile.segmenter == str(tmp_path / "facebook/mask2former-swin-large-coco-panoptic")
    assert profile.sbert == str(tmp_path / "sentence-transformers/stsb-mpnet-base-v2")
    assert profile.matcher_clip == f"local-dir:{tmp_path / 'ViT-H-14/laion2b_s32b_b79k'}"
    assert profile.matcher_clip_pretrained == ""
    assert profile.stable_diffusion == str(tmp_path / "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert profile.image_encoder == profile.prompt_clip == str(tmp_path / "openai/clip-vit-large-patch14")
    assert profile.facenet == str(tmp_path / "facenet-pytorch/20180402-114759-vggface2.pt")
    assert get_profile(profile) == profile  # resolving twice changes nothing
    # an explicit local path stays; the tiny profile and models_dir="" ignore the store
    assert get_profile("paper", captioner="/models/blip2").captioner == "/models/blip2"
    clip_file = get_profile("paper", matcher_clip_pretrained="/models/vit-h-14.bin")
    assert (clip_file.matcher_clip, clip_file.matcher_clip_pretrained) == ("ViT-H-14", "/models/vit-h-14.bin")
    assert not get_profile("tiny").offline
    assert get_profile("paper", models_dir="").captioner == "Salesforce/blip2-opt-6.7b-coco"


def test_check_lists_each_model_with_its_size(model_store, tmp_path, capsys):
    rows = {row["model"]: row for row in check("paper", model_store)}
    assert {name: row["parameters"] for name, row in rows.items()} == PAPER_PARAMETERS
    assert all(row["present"] and row["files"] >= 1 and row["bytes"] > 0 for row in rows.values())
    assert rows["captioner"]["fp16_gib"] == round(PAPER_PARAMETERS["captioner"] * 2 / GIB, 2) == 14.44
    assert rows["facenet"]["files"] == 1 and rows["stable_diffusion"]["files"] >= 10

    assert main(["models", "check", "--models", str(model_store)]) == 0
    out = capsys.readouterr().out
    assert "7,752,738,304" in out and "MISSING" not in out
    # an empty store: everything missing, exit 1 and the command that fills it
    assert main(["--models", str(tmp_path), "models", "check"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("MISSING") == 7 and "fc-pipeline models download" in captured.err
    # a configuration without weights (an interrupted download) is not a model
    (tmp_path / "facebook/mask2former-swin-large-coco-panoptic").mkdir(parents=True)
    (tmp_path / "facebook/mask2former-swin-large-coco-panoptic/config.json").write_text("{}")
    assert not next(row for row in check("paper", tmp_path) if row["model"] == "segmenter")["present"]


def test_download_fetches_with_the_libraries_own_functions(tmp_path, monkeypatch):
    import huggingface_hub
    import open_clip

    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns, ignore_patterns):
        calls.append(("hub", repo_id))
        # safetensors preferred; SD 1.5: its component folders, not the single-file checkpoints
        assert ("*.bin" in ignore_patterns) == (repo_id != "facebook/mask2former-swin-large-coco-panoptic")
        sd = repo_id.startswith("stable-diffusion")
        assert allow_patterns == (["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"] if sd else None)
        marker = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "model_index.json"}.get(repo_id, "config.json")
        if repo_id.startswith("sentence-transformers/"):
            marker = "modules.json"
        Path(local_dir).mkdir(parents=True)
        (Path(local_dir) / marker).write_text("{}")
        (Path(local_dir) / "model.safetensors").write_bytes(b"w")
        assert "safety_checker/*" in ignore_patterns and "*.msgpack" in ignore_patterns

    def download_pretrained(cfg, cache_dir):
        calls.append(("open_clip", cfg["hf_hub"]))
        weights = Path(cache_dir) / "open_clip_pytorch_model.bin"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"w")
        return str(weights)

    def download_url_to_file(url, dst):
        calls.append(("url", url))
        Path(dst).write_bytes(b"w")

    def list_repo_files(repo_id):
        weights = "pytorch_model.bin" if repo_id.startswith("facebook/") else "model.safetensors"
        return ["config.json", weights]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(open_clip, "download_pretrained", download_pretrained)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    assert main(["models", "download", "--to", str(tmp_path)]) == 0  # then checks: all present
    assert sorted(calls) == [
        ("hub", "Salesforce/blip2-opt-6.7b-coco"),
        ("hub", "facebook/mask2former-swin-large-coco-panoptic"),
        ("hub", "openai/clip-vit-large-patch14"),  # once for the subject encoder and the evaluation
        ("hub", "sentence-transformers/stsb-mpnet-base-v2"),
        ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("open_clip", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/"),
        ("url", "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"),
    ]
    clip_dir = tmp_path / "ViT-H-14/laion2b_s32b_b79k"
    assert sorted(p.name for p in clip_dir.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    calls.clear()
    pretrained.download("paper", tmp_path, log=lambda _: None)  # a full store downloads nothing
    assert calls == []


def _gpu_with(monkeypatch, free_gib: float, total_gib: float = 48.0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))


def test_the_memory_plan_counts_weights_optimiser_and_batch():
    train = plan_step("train", "paper")
    # UNet 859,520,964 + fuser 2,958,336 + the image encoder's last two blocks 25,192,448 train:
    # an fp32 gradient and two fp32 AdamW moments each
    assert train.parameters == 1_373_159_851 and train.optimizer == 12 * 887_671_748
    assert train.weights == 4 * train.parameters and train.batch == 16
    assert plan_step("train", "paper", batch=8).activations == train.activations // 2
    assert plan_step("train", "paper", resolution=256).activations == train.activations // 4
    caption = plan_step("caption", "paper", dtype="float16", batch=1)
    assert caption.weights == 2 * PAPER_PARAMETERS["captioner"] and caption.optimizer == 0
    assert caption.describe().startswith(
        "caption: 15.7 GiB = weights 14.4 (7,752,738,304 params, float16) + activations 0.3"
    )


def test_a_step_that_cannot_fit_is_refused_before_loading(monkeypatch, capsys):
    from fc_pipeline.data.captioning import Captioner
    from fc_pipeline.data.segmentation import Segmenter

    _gpu_with(monkeypatch, free_gib=20.0)
    # BLIP-2 in float32 needs ~32 GiB: refused with the numbers, and nothing is loaded (no store here)
    with pytest.raises(MemoryPlanError, match=r"caption: 32\.3 GiB = weights 28\.9 .* 20\.0 GiB free of 48\.0 GiB"):
        Captioner("paper", device="cuda")
    loaded = []

    def no_weights(*args, **kwargs):
        loaded.append(args)
        raise OSError("no weights here")

    monkeypatch.setattr("transformers.Mask2FormerImageProcessor.from_pretrained", no_weights)
    with pytest.raises(OSError):  # fits, so it goes on to load (and fails: no weights)
        Segmenter("paper", device="cuda")
    assert loaded

    assert main(["models", "plan", "--device", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "caption: 32.3 GiB" in out and "DOES NOT FIT" in out and "segment: 5.0 GiB" in out
    assert "too small for caption, train" in out
    _gpu_with(monkeypatch, free_gib=139.0, total_gib=140.0)
    assert main(["models", "plan", "--device", "cuda"]) == 0
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_the_tiny_profile_and_the_cpu_are_never_planned(monkeypatch):
    from fc_pipeline.pretrained import check_step_memory

    _gpu_with(monkeypatch, free_gib=0.1)
    assert check_step_memory("train", "tiny", "cuda") is None
    assert check_step_memory("train", "paper", "cpu") is None
    with pytest.raises(MemoryPlanError):
        check_step_memory("train", "paper", torch.device("cuda", 0))


def test_stored_models_name_each_role_once():
    models = stored_models("paper", "/store")
    assert [m.name for m in models] == list(PAPER_PARAMETERS)
    clip = next(m for m in models if m.name == "image_encoder+prompt_clip")
    assert clip.fields == ("image_encoder", "prompt_clip") and clip.path == Path("/store/openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="tiny"):
        stored_models("tiny")
    with pytest.raises(SystemExit, match="use --profile paper"):
        main(["models", "check", "--profile", "tiny"])


def test_generation_refuses_a_checkpoint_that_cannot_fit(tmp_path, monkeypatch, capsys):
    from fc_pipeline.cli.generation import JobError, load_pipeline
    from fc_pipeline.model.components import MODEL_NAMES, load_components
    from fc_pipeline.pipeline import FastComposerPipeline
    from fc_pipeline.pretrained import check_checkpoint_memory, checkpoint_parameters

    parts = load_components("tiny")
    FastComposerPipeline.from_components(parts).save_pretrained(tmp_path / "ckpt")
    parameters = sum(p.numel() for name in MODEL_NAMES for p in parts[name].parameters())
    assert checkpoint_parameters(tmp_path / "ckpt") == parameters  # from the safetensors headers
    _gpu_with(monkeypatch, free_gib=2.0)
    plan = check_checkpoint_memory("evaluate", tmp_path / "ckpt", "cuda", torch.float16, batch=2)
    assert plan.weights == 2 * parameters and plan.batch == 2  # and 64 px images: tiny activations
    assert check_checkpoint_memory("generate", tmp_path / "ckpt", "cpu") is None
    _gpu_with(monkeypatch, free_gib=0.5)  # less than the CUDA overhead alone: refused before loading
    with pytest.raises(JobError, match=r"generate: 1\.0 GiB = weights 0\.0 .* 0\.5 GiB free of 48\.0 GiB"):
        load_pipeline(tmp_path / "ckpt", device="cuda")
