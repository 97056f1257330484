"""Library image preprocessing against the arithmetic proxytune needs, on real DreamBench photos.

- Student tokenizers (`students.api.images_to_pixels`): RGB, bicubic resize to S x S, x / 127.5 - 1.
  diffusers' VaeImageProcessor gives the same pixels, so proxytune uses it.
- DINO (`encoders.dino_preprocess`): DreamBench's torchvision Resize(256, bicubic) + CenterCrop(224)
  + ImageNet normalisation. transformers' BitImageProcessor gives the same pixels where the crop
  offset (size - 224) / 2 is whole, but it floors a half offset where torchvision rounds it (half to
  even), so the hand-written version stays; the last test pins where the two part.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from proxytune.backends import encoders
from proxytune.backends.students.api import images_to_pixels


@pytest.fixture(scope="module")
def photos(dreambench):
    """Three reference JPEGs, plus non-square crops of the first (landscape and portrait)."""
    images = [Image.open(path) for path in sorted(dreambench.glob("*/00.jpg"))[:3]]
    first = images[0]
    return images + [first.crop((0, 0, first.width, first.height * 3 // 4)),
                     first.crop((0, 0, first.width * 2 // 3, first.height))]


def plain_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The arithmetic the student tokenizers were trained with: PIL bicubic, then x / 127.5 - 1."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.mark.parametrize("size", [64, 256])
def test_student_pixels_are_the_plain_bicubic_arithmetic(photos, size):
    squares = [p.crop((0, 0, min(p.size), min(p.size))) for p in photos]
    squares.append(squares[0].resize((size, size)).convert("L"))  # already sized, and not RGB
    got = images_to_pixels(squares, size)
    want = torch.stack([plain_pixels(image, size) for image in squares])
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-6


def bit_processor():
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(size={"shortest_edge": encoders.DINO_RESIZE}, resample=Image.BICUBIC,
                                crop_size={"height": encoders.DINO_CROP, "width": encoders.DINO_CROP},
                                image_mean=list(encoders.IMAGENET_MEAN), image_std=list(encoders.IMAGENET_STD),
                                do_convert_rgb=True)


def test_bit_image_processor_matches_dino_preprocessing_on_whole_crop_offsets(photos):
    processor = bit_processor()
    for image in photos:
        got = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert (got - encoders.dino_preprocess([image])).abs().max() <= 1e-6


def normalised(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W): x / 255, then ImageNet mean and std."""
    mean = torch.tensor(encoders.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(encoders.IMAGENET_STD).view(3, 1, 1)
    return ((torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255.0 - mean) / std)[None]


def test_bit_image_processor_parts_from_torchvision_on_a_half_crop_offset(photos):
    """686 x 512 resizes to 343 x 256: torchvision (and dino_preprocess) crop from round(59.5) = 60,
    transformers from 59; the same pixels shifted by one column are not the same input."""
    image = photos[0].crop((0, 0, 686, 512))
    resized = image.resize((343, 256), Image.BICUBIC)
    ours = encoders.dino_preprocess([image])
    theirs = bit_processor()(images=[image], return_tensors="pt")["pixel_values"]
    assert (ours - normalised(resized.crop((60, 16, 284, 240)))).abs().max() <= 1e-6
    assert (theirs - normalised(resized.crop((59, 16, 283, 240)))).abs().max() <= 1e-6
    assert (ours - theirs).abs().max() > 1e-3
