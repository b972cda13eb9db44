"""What the paper checkpoints do at their loading and preprocessing lines, pinned on the stand-ins.

A regression here (a processor built by hand, a threshold or label set lost, a pooling change)
would silently change every real run while the tiny profile stays green.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fc_pipeline.data.segmentation import COCO_THING_LABELS

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))


def _record_kwargs(monkeypatch, cls, calls: list) -> None:
    load = cls.from_pretrained

    def recording(*args, **kwargs):
        calls.append((cls.__name__, kwargs))
        return load(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", recording)


def test_captioner_blip2_224px_no_text_prompt(paper_store, photo, monkeypatch):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from fc_pipeline.data.captioning import Captioner

    calls = []
    for cls in (Blip2Processor, Blip2ForConditionalGeneration):
        _record_kwargs(monkeypatch, cls, calls)
    captioner = Captioner("paper")
    assert [kwargs["local_files_only"] for _, kwargs in calls] == [True, True]  # never the hub
    images = captioner.processor.image_processor
    assert (images.size["height"], images.size["width"]) == (224, 224)
    assert list(images.image_mean) == CLIP_MEAN and list(images.image_std) == CLIP_STD
    assert images.resample == BICUBIC and captioner.processor.num_query_tokens == 32
    assert captioner.model.config.num_query_tokens == 32 and captioner.max_new_tokens == 30

    seen = {}
    generate = captioner.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captions = captioner.caption([photo, photo.convert("L").convert("RGB")])
    # the image alone prompts: the query-token placeholders and BOS, no text prompt, 30 new tokens
    assert set(seen) == {"pixel_values", "max_new_tokens"} and seen["max_new_tokens"] == 30
    assert tuple(seen["pixel_values"].shape) == (2, 3, 224, 224)
    assert len(captions) == 2 and all(c == c.strip() for c in captions)


def test_segmenter_mask2former_133_labels_and_thresholds(paper_store, photo, monkeypatch):
    from fc_pipeline.data.segmentation import Segmenter

    segmenter = Segmenter("paper")
    assert len(segmenter.id2label) == 133 and segmenter.id2label[0] == "person"
    assert {segmenter.id2label[i] for i in range(80)} == COCO_THING_LABELS
    assert {segmenter.id2label[i] for i in segmenter.stuff_label_ids} >= {"sky-other-merged", "grass-merged"}
    assert len(segmenter.stuff_label_ids) == 53
    processor = segmenter.processor
    assert (processor.size["shortest_edge"], processor.size["longest_edge"], processor.size_divisor) == (384, 1333, 32)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]

    seen = {}
    post_process = processor.post_process_panoptic_segmentation

    def spy(outputs, **kwargs):
        seen.update(kwargs)
        return post_process(outputs, **kwargs)

    monkeypatch.setattr(processor, "post_process_panoptic_segmentation", spy)
    ((id_map, segments),) = segmenter.segment([photo])
    assert (seen["threshold"], seen["mask_threshold"], seen["overlap_mask_area_threshold"]) == (0.8, 0.5, 0.8)
    assert seen["label_ids_to_fuse"] == segmenter.stuff_label_ids and seen["target_sizes"] == [(300, 400)]
    assert id_map.shape == (300, 400) and id_map.dtype == np.uint16
    assert segments == []  # random weights clear no threshold; the dataset tests provide annotations


def test_matcher_open_clip_224px_and_mean_pooled_sbert(paper_store, photo):
    from sentence_transformers import models

    from fc_pipeline.data.matching import SubjectMatcher

    matcher = SubjectMatcher("paper")
    pixels = matcher.preprocess(photo)
    assert tuple(pixels.shape) == (3, 224, 224)
    resize, crop, *_, normalize = matcher.preprocess.transforms
    assert resize.size == 224 and resize.interpolation.value == "bicubic" and crop.size == (224, 224)
    assert list(normalize.mean) == pytest.approx(CLIP_MEAN) and list(normalize.std) == pytest.approx(CLIP_STD)
    assert tuple(matcher.tokenizer(["a man", "a dog"]).shape) == (2, 77)
    assert matcher.clip_similarity([photo], ["a man", "a dog"]).shape == (1, 2)

    transformer, pooling = matcher.sbert  # stsb-mpnet-base-v2: MPNet + mean pooling, no Normalize module
    assert isinstance(transformer, models.Transformer) and type(transformer.auto_model).__name__ == "MPNetModel"
    assert isinstance(pooling, models.Pooling) and pooling.pooling_mode == "mean"
    assert matcher.sbert.max_seq_length == 75
    # the matcher normalises the embeddings itself: a label against itself is exactly 1
    similarity = matcher.label_similarity(["person", "sky-other-merged"], ["person", "sky"])
    assert np.diag(similarity) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert matcher.default_threshold == 0.2


def test_fastcomposer_components_sd15_folder_and_clip_l14(paper_store, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fc_pipeline.model.components import load_components
    from fc_pipeline.pipeline import FastComposerPipeline

    calls = []
    for cls in (AutoencoderKL, UNet2DConditionModel):
        _record_kwargs(monkeypatch, cls, calls)
    parts = load_components("paper")
    assert [kwargs["local_files_only"] for _, kwargs in calls] == [True, True]
    assert parts["tokenizer"].model_max_length == 77
    assert parts["text_encoder"].config.max_position_embeddings == 77
    features = parts["feature_extractor"]  # CLIP ViT-L/14's own preprocessing of reference images
    assert features.size["shortest_edge"] == 224 and (features.crop_size["height"], features.crop_size["width"]) == (
        224,
        224,
    )
    assert list(features.image_mean) == CLIP_MEAN and parts["image_encoder"].config.image_size == 224
    schedule = parts["scheduler"].config  # training noise: DDPM over SD 1.5's scaled-linear betas
    assert type(parts["scheduler"]).__name__ == "DDPMScheduler"
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert schedule.prediction_type == "epsilon" and schedule.num_train_timesteps == 1000
    pipe = FastComposerPipeline.from_components(parts)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 512


def test_prompt_clip_l14_224px_77_tokens(model_store, photo):
    from assets.resources import EvaluatorResource
    from fc_pipeline.evaluation.prompt_consistency import PromptConsistency

    # through the Dagster resource, its models_dir naming the store
    scorer = EvaluatorResource(profile="paper", models_dir=str(model_store), device="cpu").prompt_scorer()
    assert isinstance(scorer, PromptConsistency)
    processor = scorer.image_processor
    assert (
        processor.size["shortest_edge"] == 224 and processor.crop_size["height"] == processor.crop_size["width"] == 224
    )
    assert list(processor.image_mean) == CLIP_MEAN and list(processor.image_std) == CLIP_STD
    assert scorer.tokenizer.model_max_length == 77
    pixels = processor([photo], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    assert scorer.score([photo], ["a man <|image|> on a beach"]).shape == (1,)


def test_facenet_vggface2_160px_crops(paper_store, faces_dir):
    from assets.resources import EvaluatorResource
    from fc_pipeline.evaluation.faces import FACE_SIZE, FaceScorer, TorchFaceNetEmbedder
    from fc_pipeline.profiles import get_profile

    assert get_profile("paper").facenet == str(paper_store / "facenet-pytorch/20180402-114759-vggface2.pt")
    scorer = EvaluatorResource(profile="paper", models_dir=str(paper_store), device="cpu").face_scorer()
    assert isinstance(scorer, FaceScorer)
    assert isinstance(scorer.embedder, TorchFaceNetEmbedder) and scorer.embedder.name.endswith("vggface2.pt")
    assert scorer.detector.mtcnn.image_size == FACE_SIZE == 160
    photo = Image.open(next((faces_dir / "subjects").iterdir()) / "1.jpg").convert("RGB")
    boxes, _, crops = scorer.detector.detect(photo)
    assert len(boxes) >= 1 and tuple(crops.shape[1:]) == (3, 160, 160)
    embeddings = scorer.embedder.embed(crops)
    assert embeddings.shape == (len(boxes), 512)
    assert np.linalg.norm(embeddings, axis=1) == pytest.approx(1.0, abs=1e-5)
