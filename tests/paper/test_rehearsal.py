"""Dress rehearsal: the whole product on ``profile=paper``, pointed at the stand-in model store.

The six dataset assets through ``dagster.materialize`` (the demo corpus partition, models from the
resources' ``models_dir``), a few training steps at the paper's 512 px, generation from the
checkpoint, and ``fc-pipeline --models DIR evaluate`` with the paper scorers. Every loading and
preprocessing line of the paper profile runs here (``make coverage-paper`` reports them).
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
from PIL import Image

import assets
from assets.resources import CaptionerResource, DatasetStore, MatcherResource, SegmenterResource
from fc_pipeline.cli.main import main
from fc_pipeline.pretrained import MODELS_ENV
from tests.dagster.conftest import CORPUS, DATASET_ASSETS, RUN_CONFIG


@pytest.mark.slow
def test_the_paper_profile_end_to_end(model_store, tmp_path, faces_dir, monkeypatch):
    # --- dataset: the six assets, each model resource on the paper profile and the store
    paper = dict(profile="paper", models_dir=str(model_store), device="cpu")
    resources = {
        **assets.defs.resources,
        "store": DatasetStore(data_root=str(tmp_path / "data")),
        "captioner": CaptionerResource(**paper),
        "segmenter": SegmenterResource(**paper),
        "matcher": MatcherResource(**paper),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("corpus", [CORPUS])
        result = dg.materialize(
            DATASET_ASSETS, resources=resources, instance=instance, partition_key=CORPUS, run_config=RUN_CONFIG
        )
    assert result.success
    materialised = {event.asset_key.path[-1] for event in result.get_asset_materialization_events()}
    assert materialised == {spec.key.path[-1] for spec in DATASET_ASSETS}
    # the annotated demo scenes keep their people as subjects; the stand-in captioner and segmenter ran too
    shards = resources["store"].path(CORPUS, "shards")
    assert json.loads((shards / "train" / "_stats.json").read_text())["samples"] >= 1

    # --- training: a few steps at the paper's 512 px on the store's SD 1.5 and CLIP ViT-L/14
    from fc_pipeline.training.train import TrainConfig, train

    monkeypatch.setenv(MODELS_ENV, str(model_store))
    run = train(
        TrainConfig(
            shards=str(shards),
            output_dir=str(tmp_path / "run"),
            profile="paper",
            max_steps=2,
            train_batch_size=2,
            checkpoint_every=2,
            progress=False,
        )
    )
    assert run.steps == 2 and run.loss == run.loss  # finite

    # --- generation from the checkpoint: SD 1.5's PNDM sampler, 512 px by default
    from fc_pipeline.pipeline import FastComposerPipeline

    pipe = FastComposerPipeline.from_pretrained(run.checkpoint)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    face = Image.open(next((faces_dir / "subjects").iterdir()) / "1.jpg").convert("RGB")
    image = pipe("a man <|image|> on a beach", subject_images=[face], num_inference_steps=2).images[0]
    assert image.size == (512, 512)

    # --- evaluation through the CLI, once: paper scorers (CLIP ViT-L/14, vggface2 FaceNet) from the store
    monkeypatch.delenv(MODELS_ENV)
    report = tmp_path / "report"
    argv = ["--models", str(model_store), "evaluate", "--checkpoint", str(run.checkpoint), "--out", str(report)]
    argv += ["--profile", "paper", "--device", "cpu", "--images-per-prompt", "1", "--steps", "2"]
    argv += ["--max-prompts", "1", "--max-subject-groups", "1", "--no-baseline", "--resolution", "256"]
    assert main(argv) == 0
    assert (report / "report.md").is_file()
