"""Subject reference images (paper §4.1): one preprocessing for training and inference.

As in the official code (``fastcomposer/transforms.py``): a reference is padded to a square with
black (``PadToSquare(fill=0)``), resized to the image encoder's size (bilinear, antialiased) and
CLIP-normalised, so a non-square photo keeps its sides. Training first cuts the subject out of
its image (the bounding box of its mask, background replaced by uniform noise) and, with a
:class:`ReferenceAugmentation`, zooms in before padding and augments after resizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch

if TYPE_CHECKING:
    from torchvision.transforms import v2  # imported on use (as transformers): importing REFERENCE_FILLS stays light

# How the crop is padded to a square: "zeros" (official PadToSquare(fill=0)) or "noise" (the
# same uniform noise as the background; the earlier training form, inference always pads black).
REFERENCE_FILLS = ("zeros", "noise")


@dataclass(frozen=True)
class ReferenceAugmentation:
    """Random training augmentations with the probabilities of the official ``get_object_transforms``
    (reference) and ``TrainTransformWithSegmap`` (target image flip)."""

    zoom_prob: float = 0.5  # zoom in by U(1, max_zoom), keep the top square of a tall crop; before padding
    max_zoom: float = 2.0
    rotate_prob: float = 0.75  # the rest act on the resized square
    degrees: float = 30.0
    jitter_prob: float = 0.5
    jitter: float = 0.5  # brightness, contrast, saturation and hue
    blur_prob: float = 0.5  # Gaussian blur, kernel 5, sigma U(0.1, 2)
    grayscale_prob: float = 0.1
    flip_prob: float = 0.5
    elastic_prob: float = 0.5
    target_flip_prob: float = 0.5  # the target image flipped with its masks (references stay as cut)

    def transforms(self) -> v2.Compose:
        """The augmentations applied to the resized reference (``uint8 [3, size, size]``)."""
        from torchvision.transforms import v2

        jitter = self.jitter
        return v2.Compose(
            [
                v2.RandomApply(
                    [v2.RandomAffine(self.degrees, interpolation=v2.InterpolationMode.BILINEAR)], p=self.rotate_prob
                ),
                v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter)], p=self.jitter_prob),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=self.blur_prob),
                v2.RandomGrayscale(p=self.grayscale_prob),
                v2.RandomHorizontalFlip(p=self.flip_prob),
                v2.RandomApply([v2.ElasticTransform()], p=self.elastic_prob),
            ]
        )

    def zoom_in(self, crop: torch.Tensor) -> torch.Tensor:
        """With ``zoom_prob``: enlarge by U(1, ``max_zoom``), then keep the top square if taller than wide."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if torch.rand(()).item() >= self.zoom_prob:
            return crop
        zoom = 1.0 + torch.rand(()).item() * (self.max_zoom - 1.0)
        height, width = (int(zoom * side) for side in crop.shape[-2:])
        crop = TF.resize(crop, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return crop[:, :width] if height > width else crop


def reference_pixels(
    image: PIL.Image.Image | torch.Tensor,
    size: int,
    *,
    canvas: torch.Tensor | None = None,
    augment: v2.Transform | None = None,
) -> torch.Tensor:
    """CLIP-normalised ``float [3, size, size]`` of a reference photo (PIL or ``uint8 [3, H, W]``):
    centred on a black square (or on ``canvas``, ``uint8 [3, s, s]`` with ``s`` the photo's longer
    side), resized bilinearly with antialiasing, then ``augment`` (``uint8`` in, ``uint8`` out)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pixels = TF.pil_to_tensor(image.convert("RGB")) if isinstance(image, PIL.Image.Image) else image
    height, width = pixels.shape[-2:]
    side = max(height, width)
    if canvas is None:
        canvas = pixels.new_zeros(3, side, side)
    elif canvas.shape[-2:] != (side, side):
        raise ValueError(f"padding canvas {tuple(canvas.shape)} does not fit a {height}x{width} reference")
    else:
        canvas = canvas.clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = pixels
    square = TF.resize(canvas, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if augment is not None:
        square = augment(square)
    return TF.normalize(TF.to_dtype(square, torch.float32, scale=True), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def subject_reference(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    fill: str = "zeros",
    augmentation: ReferenceAugmentation | None = None,
) -> torch.Tensor:
    """The training reference of one subject: the bounding box of ``mask`` (bool ``[H, W]``) in
    ``image`` (``uint8 [H, W, 3]``) with the background replaced by uniform noise, then
    :func:`reference_pixels`. Every random draw comes from ``rng`` (the torch global RNG is untouched)."""
    if fill not in REFERENCE_FILLS:
        raise ValueError(f"unknown reference fill {fill!r}; choose one of {REFERENCE_FILLS}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the subject's mask is empty")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop, inside = image[top:bottom, left:right], mask[top:bottom, left:right]
    background = rng.integers(0, 256, size=crop.shape, dtype=np.uint8)
    cut = torch.from_numpy(np.where(inside[..., None], crop, background)).permute(2, 0, 1)

    def finish(cut: torch.Tensor, augment: v2.Transform | None) -> torch.Tensor:
        canvas = None
        if fill == "noise":
            side = max(cut.shape[-2:])
            canvas = torch.from_numpy(rng.integers(0, 256, size=(3, side, side), dtype=np.uint8))
        return reference_pixels(cut, size, canvas=canvas, augment=augment)

    if augmentation is None:
        return finish(cut, None)
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
        torch.default_generator.manual_seed(int(rng.integers(2**63)))
        return finish(augmentation.zoom_in(cut), augmentation.transforms())
