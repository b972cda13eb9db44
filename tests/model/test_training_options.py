import json

import pytest

from fc_pipeline.training.train import TrainConfig, train


@pytest.mark.slow  # three short training runs
def test_augmented_run_with_the_earlier_loss_forms_resumes_exactly(synthetic_shards, tmp_path):
    options = dict(
        resolution=32,
        train_batch_size=2,
        max_steps=2,
        checkpoint_every=1,
        progress=False,
        augment=True,
        reference_fill="noise",
        masked_loss="sample",
        localization_average="subjects",
        mask_loss_prob=1.0,
    )
    # the official augmentations with the earlier forms of the other options: all from the sample seed
    full = train(TrainConfig.tiny(str(synthetic_shards), str(tmp_path / "full"), **options))
    train(TrainConfig.tiny(str(synthetic_shards), str(tmp_path / "resumed"), **{**options, "max_steps": 1}))
    resumed = train(TrainConfig.tiny(str(synthetic_shards), str(tmp_path / "resumed"), **options))
    assert resumed.resumed_from == 1 and resumed.steps == 2
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(full.history, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["l_loc"] == pytest.approx(a["l_loc"], rel=1e-4, abs=1e-8)
