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


def test_denoising_loss_plain_and_masked():
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :2, :] = 1.0  # error only in the top half
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4] = 1  # sample 0: subject covers the top half
    valid = torch.tensor([[True], [True]])
    assert denoising_loss(pred, target).item() == pytest.approx(0.5)
    # sample 0 masked -> error 1 inside its mask; sample 1 has an empty mask -> plain MSE 0.5
    masked = denoising_loss(pred, target, masks, valid, masked=torch.tensor([True, True]))
    assert masked.item() == pytest.approx((1.0 + 0.5) / 2)
    # invalid subjects do not count towards the union
    unmasked = denoising_loss(pred, target, masks, torch.tensor([[False], [True]]), masked=torch.tensor([True, True]))
    assert unmasked.item() == pytest.approx(0.5)
    assert denoising_loss(pred, target, masks, valid, masked=torch.tensor([False, False])).item() == pytest.approx(0.5)
