import pytest
import torch

from fc_pipeline.model.losses import denoising_loss, localization_loss, localization_loss_over_layers


def _probs_with_columns(columns: dict[int, list[list[float]]], heads=2, pixels=4, tokens=4) -> torch.Tensor:
    """[1, heads, pixels, tokens] rows summing to one, with given columns per head; the rest on token 0."""
    probs = torch.zeros(1, heads, pixels, tokens)
    for token, per_head in columns.items():
        probs[0, :, :, token] = torch.tensor(per_head)
    probs[0, :, :, 0] = 1 - probs[0].sum(-1)
    assert torch.all(probs >= 0)
    return probs


def test_localization_loss_equals_hand_computed_value():
    # token 1 (subject a): head mean [0.5, 0.2, 0.2, 0.1], mask = pixel 0
    #   inside 0.5, background (0.2 + 0.2 + 0.1) / 3 = 1/6  -> 1/6 - 1/2 = -1/3
    # token 2 (subject b): head mean [0.1, 0.3, 0.2, 0.0], mask = pixel 3
    #   inside 0.0, background 0.6 / 3 = 0.2                -> +0.2
    # token 3 (subject c) is not valid and must not count: mean = (-1/3 + 0.2) / 2 = -1/15
    probs = _probs_with_columns(
        {
            1: [[0.6, 0.2, 0.1, 0.1], [0.4, 0.2, 0.3, 0.1]],
            2: [[0.1, 0.4, 0.2, 0.0], [0.1, 0.2, 0.2, 0.0]],
            3: [[0.1, 0.1, 0.1, 0.5], [0.1, 0.1, 0.1, 0.5]],
        }
    )
    masks = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [1.0, 1.0, 0, 0]]).view(1, 3, 2, 2)
    index = torch.tensor([[1, 2, 3]])
    loss = localization_loss(probs, index, masks, torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(-1 / 15, abs=1e-5)
    only_a = localization_loss(probs, index, masks, torch.tensor([[True, False, False]]))
    assert only_a.item() == pytest.approx(-1 / 3, abs=1e-5)
    assert only_a.item() < 0  # attention inside the mask gives a negative loss


def test_localization_loss_without_valid_subjects_is_zero_and_differentiable():
    probs = torch.rand(2, 2, 16, 5, requires_grad=True)
    loss = localization_loss(
        probs, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.bool)
    )
    assert loss.item() == 0.0
    loss.backward()
    assert probs.grad is not None


def test_localization_loss_resizes_masks_and_rewards_attention_inside():
    side = 8
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1  # top-left quadrant
    probs = torch.full((1, 1, side * side, 2), 0.5)
    inside = torch.zeros(side, side)
    inside[:4, :4] = 1
    probs[0, 0, :, 1] = 0.05 + 0.9 * inside.flatten()
    probs[0, 0, :, 0] = 1 - probs[0, 0, :, 1]
    good = localization_loss(probs, torch.tensor([[1]]), mask, torch.tensor([[True]]))
    bad = localization_loss(probs, torch.tensor([[1]]), 1 - mask, torch.tensor([[True]]))
    assert good.item() == pytest.approx(-0.9, abs=1e-5) and bad.item() == pytest.approx(0.9, abs=1e-5)


def test_localization_loss_over_layers_averages_subject_columns():
    a = torch.rand(1, 2, 4, 2)
    b = torch.rand(1, 2, 16, 2)
    masks = torch.rand(1, 2, 4, 4)
    valid = torch.tensor([[True, True]])
    index = torch.tensor([[0, 1]])
    expected = (localization_loss(a, index, masks, valid) + localization_loss(b, index, masks, valid)) / 2
    assert torch.allclose(localization_loss_over_layers({"x": a, "y": b}, masks, valid), expected)
    with pytest.raises(ValueError, match="no attention maps"):
        localization_loss_over_layers({}, masks, valid)


def test_denoising_loss_plain_and_masked_per_sample():
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :2, :] = 1.0  # error only in the top half
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4] = 1  # sample 0: subject covers the top half
    valid = torch.tensor([[True], [True]])
    assert denoising_loss(pred, target).item() == pytest.approx(0.5)
    # the "sample" form (the earlier default): sample 0 masked -> error 1 inside its mask;
    # sample 1 has an empty mask -> plain MSE 0.5
    masked = denoising_loss(pred, target, masks, valid, masked=torch.tensor([True, True]), form="sample")
    assert masked.item() == pytest.approx((1.0 + 0.5) / 2)
    # invalid subjects do not count towards the union
    unmasked = denoising_loss(
        pred, target, masks, torch.tensor([[False], [True]]), masked=torch.tensor([True, True]), form="sample"
    )
    assert unmasked.item() == pytest.approx(0.5)
    off = denoising_loss(pred, target, masks, valid, masked=torch.tensor([False, False]), form="sample")
    assert off.item() == pytest.approx(0.5)


def test_denoising_loss_masked_batch_as_the_official_code():
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :2, :] = 1.0  # error 1 in the top half of both samples: 2 × 32 of 128 elements
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4] = 1  # sample 0: subject over the top half; sample 1: no subject
    valid = torch.tensor([[True], [False]])
    # pred·m and target·m, MSE over all 128 elements: sample 0 keeps its 32 errors, sample 1 gives 0
    masked = denoising_loss(pred, target, masks, valid, masked=torch.tensor(True))
    assert masked.item() == pytest.approx(32 / 128)
    assert denoising_loss(pred, target, masks, valid, masked=torch.tensor(False)).item() == pytest.approx(64 / 128)
    # a mask of 0.5 (half of each latent cell covered) scales the squared error by 0.25
    half = torch.zeros(2, 1, 8, 8)
    half[0, 0, :, ::2] = 1
    assert denoising_loss(pred, target, half, valid, masked=torch.tensor(True)).item() == pytest.approx(0.25 * 32 / 128)
    with pytest.raises(ValueError, match="one flag per batch"):
        denoising_loss(pred, target, masks, valid, masked=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="unknown masked denoising loss form"):
        denoising_loss(pred, target, masks, valid, masked=torch.tensor(True), form="area")


def test_localization_loss_averages_per_sample_then_over_the_batch():
    # per subject (see test_localization_loss_equals_hand_computed_value): a -1/3, b +0.2
    probs = _probs_with_columns(
        {
            1: [[0.6, 0.2, 0.1, 0.1], [0.4, 0.2, 0.3, 0.1]],
            2: [[0.1, 0.4, 0.2, 0.0], [0.1, 0.2, 0.2, 0.0]],
        }
    ).expand(3, -1, -1, -1)
    masks = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]).view(1, 2, 2, 2).expand(3, -1, -1, -1)
    index = torch.tensor([[1, 2]]).expand(3, -1)
    # sample 0: a and b; sample 1: a only; sample 2: no subject (unconditional or text-only)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    official = localization_loss(probs, index, masks, valid)
    assert official.item() == pytest.approx(((-1 / 3 + 0.2) / 2 + (-1 / 3) + 0) / 3, abs=1e-5)  # -2/15
    subjects = localization_loss(probs, index, masks, valid, average="subjects")
    assert subjects.item() == pytest.approx((-1 / 3 + 0.2 - 1 / 3) / 3, abs=1e-5)  # -7/45
    maps = {"x": probs, "y": probs}
    assert localization_loss_over_layers(maps, masks, valid, index).item() == pytest.approx(-2 / 15, abs=1e-5)
    assert localization_loss_over_layers(maps, masks, valid, index, average="subjects").item() == pytest.approx(
        -7 / 45, abs=1e-5
    )
    with pytest.raises(ValueError, match="unknown localisation loss average"):
        localization_loss(probs, index, masks, valid, average="layers")
