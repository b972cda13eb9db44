"""Generation speed options (``fc-pipeline generate --offload --channels-last --compile``)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DConditionModel

from fc_pipeline.cli import main
from fc_pipeline.cli.generation import load_pipeline

PROMPT = "a man <|image|> and a woman <|image|> on the beach"
SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def generate(checkpoint, subject_paths, out, *flags: str) -> np.ndarray:
    subjects = [arg for path in subject_paths for arg in ("--subject", str(path))]
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(checkpoint),
                "--prompt",
                PROMPT,
                *subjects,
                *SMALL,
                "--out",
                str(out),
                *flags,
            ]
        )
        == 0
    )
    return np.asarray(PIL.Image.open(out), dtype=np.int16)


def test_offload_and_channels_last_give_the_same_image(checkpoint, subject_paths, tmp_path):
    plain = generate(checkpoint, subject_paths, tmp_path / "plain.png")
    # the offload hooks run on the CPU too (they move nothing there): the code path is the GPU's
    offloaded = generate(checkpoint, subject_paths, tmp_path / "offload.png", "--offload")
    channels_last = generate(checkpoint, subject_paths, tmp_path / "cl.png", "--channels-last")
    assert np.array_equal(offloaded, plain)
    assert np.abs(channels_last - plain).max() <= 2  # another convolution kernel: rounding only


def test_channels_last_and_compile_reach_the_unet(checkpoint, monkeypatch):
    compiled = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self, *a, **k: compiled.append(self))
    pipeline = load_pipeline(checkpoint, channels_last=True, compile=True)
    assert compiled == [pipeline.unet]
    weight = pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
