"""Evaluation encoders and DreamBench metrics: tiny CLIP / DINO builds, preprocessing, metric maths."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from proxytune.backends import dreambench_prompts, encoders
from proxytune.errors import ProxytuneError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private tiny-model cache for this module."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("encoders-home")
    mp.setenv("PROXYTUNE_HOME", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def clip(home):
    return encoders.load_clip("tiny-clip")


@pytest.fixture(scope="module")
def dino(home):
    return encoders.load_dino("tiny-dino")


def noise_image(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def gradient_image(size=(320, 240)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    rgb = np.stack([np.tile(x, (size[1], 1)), np.full((size[1], size[0]), 40.0), np.tile(x[::-1], (size[1], 1))], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def normalize_imagenet(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W), computed independently of the module."""
    values = (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(values).permute(2, 0, 1).unsqueeze(0)


# --- 1. identical vs different images ---------------------------------------------------------


def test_identical_images_score_one(clip, dino):
    images = [noise_image(0), gradient_image()]
    assert encoders.clip_i(clip.image_embeds(images[:1] * 3), clip.image_embeds(images[:1] * 2)) == pytest.approx(1.0, abs=1e-5)
    assert encoders.dino(dino.image_embeds(images[1:] * 2), dino.image_embeds(images[1:])) == pytest.approx(1.0, abs=1e-5)


def test_different_images_score_below_one(clip, dino):
    gen = [noise_image(1), noise_image(2)]
    ref = [gradient_image(), Image.new("RGB", (300, 300), (200, 30, 90))]
    assert encoders.clip_i(clip.image_embeds(gen), clip.image_embeds(ref)) < 1 - 1e-4
    assert encoders.dino(dino.image_embeds(gen), dino.image_embeds(ref)) < 1 - 1e-4


def test_embeddings_are_unit_rows_and_batch_independent(clip, dino):
    images = [noise_image(3), gradient_image(), noise_image(4)]
    for embed in (clip.image_embeds, dino.image_embeds):
        full, split = embed(images), embed(images, batch_size=2)
        assert full.shape == (3, 32)
        torch.testing.assert_close(full.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(full, split, atol=1e-5, rtol=0)
    text = clip.text_embeds(["a dog", "a dog in the jungle"])
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))


# --- 2. metric maths on known vectors ---------------------------------------------------------


def test_clip_t_is_raw_mean_rowwise_cosine():
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, -1.0], [-4.0, 0.0]])
    # cosines: 1, -1, -1/sqrt(2); negative values stay, nothing is scaled
    expected = (1.0 - 1.0 - 1.0 / math.sqrt(2)) / 3
    assert encoders.clip_t(image, text) == pytest.approx(expected, abs=1e-6)
    assert encoders.clip_t(image, text) < 0
    with pytest.raises(ValueError):
        encoders.clip_t(image, text[:2])


def test_mean_pairwise_cosine_covers_all_pairs():
    gen = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ref = torch.tensor([[1.0, 0.0], [-3.0, 0.0], [1.0, 1.0]])
    # row 1: 1, -1, 1/sqrt(2); row 2: 0, 0, 1/sqrt(2)
    expected = (1 - 1 + 0 + 0 + 2 / math.sqrt(2)) / 6
    assert encoders.mean_pairwise_cosine(gen, ref) == pytest.approx(expected, abs=1e-6)
    assert encoders.clip_i(gen, ref) == encoders.dino(gen, ref) == encoders.mean_pairwise_cosine(gen, ref)
    assert encoders.mean_pairwise_cosine(-gen, gen[:1]) == pytest.approx(-0.5, abs=1e-6)


# --- 3. prompts -------------------------------------------------------------------------------


def test_strip_identifier_keeps_class_noun():
    assert dreambench_prompts.strip_identifier("a S* dog in the jungle", "S*") == "a dog in the jungle"
    assert dreambench_prompts.strip_identifier("sks backpack on the beach", "sks") == "backpack on the beach"
    assert dreambench_prompts.strip_identifier("a photo of my sks.", "sks") == "a photo of my."
    # only whole words: "asks" and "sksx" survive
    assert dreambench_prompts.strip_identifier("he asks for a sks sksx dog", "sks") == "he asks for a sksx dog"


def test_dreambench_prompts_live_and_object():
    dog = dreambench_prompts.dreambench_prompts("S*", "dog")
    cat = dreambench_prompts.dreambench_prompts("S*", "cat")
    backpack = dreambench_prompts.dreambench_prompts("S*", "backpack")
    assert len(dog) == len(cat) == len(backpack) == 25
    assert len(set(backpack)) == 25
    assert dog[0] == "a S* dog in the jungle"
    assert "a S* dog wearing a red hat" in dog and "a S* cat wearing a red hat" in cat
    assert "a S* backpack on top of pink fabric" in backpack
    as_backpack = [p.replace("dog", "backpack") for p in dog]
    assert sum(p not in backpack for p in as_backpack) == 10  # the live-only accessories and outfits
    assert not any("wearing" in p or "outfit" in p for p in backpack)
    assert "a cube shaped S* backpack" in backpack
    assert dreambench_prompts.dreambench_prompts("S*", "toy", live=True)[10] == "a S* toy wearing a red hat"
    assert dreambench_prompts.LIVE_CLASSES == {"dog", "cat"}
    assert dreambench_prompts.strip_identifier(dog[0], "S*") == "a dog in the jungle"


# --- 4. DINO uses the CLS token, not the pooler -----------------------------------------------


def test_dino_embeds_are_cls_of_last_hidden_state(dino):
    from safetensors.torch import load_file
    from transformers import ViTModel

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # already 256: resize is a no-op
    own = normalize_imagenet(pixels[16:240, 16:240])
    with torch.no_grad():
        hidden = dino.model(pixel_values=own).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    torch.testing.assert_close(dino.image_embeds([Image.fromarray(pixels)]), expected, atol=1e-5, rtol=0)

    # like facebook/dino-vits16, the checkpoint has no pooler, and the encoder does not invent one
    state = load_file(f"{dino.path}/model.safetensors")
    assert not any(k.startswith("pooler") for k in state)
    assert dino.model.pooler is None
    # the default from_pretrained bolts on a random pooler: its output is not the CLS embedding
    torch.manual_seed(0)
    with_pooler = ViTModel.from_pretrained(dino.path).eval()
    with torch.no_grad():
        out = with_pooler(pixel_values=own)
    torch.testing.assert_close(out.last_hidden_state, hidden)
    pooled = torch.nn.functional.normalize(out.pooler_output, dim=-1)
    assert (pooled - expected).abs().max() > 1e-2
    assert dino.describe()["embedding"].startswith("CLS of last_hidden_state")


# --- 5. DINO preprocessing --------------------------------------------------------------------


def test_dino_preprocess_landscape_matches_hand_computation():
    image = noise_image(6, size=(400, 300))
    batch = encoders.dino_preprocess([image])
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    # shorter side 300 -> 256, longer 400 -> int(256 * 400 / 300) = 341; crop offsets 58 (x), 16 (y)
    resized = np.asarray(image.resize((341, 256), Image.BICUBIC))
    expected = normalize_imagenet(resized[16:240, 58:282])
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=0)


def test_dino_preprocess_portrait_and_constant_colour():
    # longer side int(256 * 410 / 300) = int(349.87) = 349 (truncated, as torchvision); top = round(62.5) = 62
    portrait = noise_image(7, size=(300, 410))
    resized = np.asarray(portrait.resize((256, 349), Image.BICUBIC))
    torch.testing.assert_close(
        encoders.dino_preprocess([portrait]), normalize_imagenet(resized[62:286, 16:240]), atol=1e-6, rtol=0
    )
    colour = (200, 30, 90)
    grey = Image.new("L", (500, 260), 100)  # converted to RGB first
    batch = encoders.dino_preprocess([Image.new("RGB", (400, 300), colour), grey])
    for image, value in enumerate([colour, (100, 100, 100)]):
        for c in range(3):
            want = (value[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            torch.testing.assert_close(batch[image, c], torch.full((224, 224), float(want)), atol=1e-6, rtol=0)


# --- 6. deterministic tiny builds and hub layout ----------------------------------------------


def test_tiny_builds_are_deterministic(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    folders = []
    for root in ("a", "b"):
        monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path / root))
        folders.append((encoders.TINY_CLIP["tiny-clip"](), encoders.TINY_DINO["tiny-dino"]()))
    for first, second in zip(*folders):
        assert first != second
        a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_tiny_clip_folder_loads_like_a_hub_repo(clip):
    from transformers import AutoProcessor, CLIPProcessor

    for processor in (CLIPProcessor.from_pretrained(clip.path), AutoProcessor.from_pretrained(clip.path)):
        inputs = processor(text=["a dog"], images=[gradient_image()], return_tensors="pt", padding=True)
        assert inputs["pixel_values"].shape == (1, 3, 224, 224)
        assert inputs["input_ids"][0, 0] == 512 and inputs["input_ids"][0, -1] == 513
    described = clip.describe()
    assert described["model"] == "tiny-clip" and described["random_init"] is True
    assert described["preprocessing"]["resample"] == "BICUBIC"
    assert described["preprocessing"]["resize"] == {"shortest_edge": 224}


# --- 7. unknown models ------------------------------------------------------------------------


def test_unknown_model_is_a_proxytune_error(home):
    with pytest.raises(ProxytuneError, match="no-such-model"):
        encoders.load_clip("no-such-model")
    with pytest.raises(ProxytuneError, match="no-such-dino"):
        encoders.load_dino("no-such-dino")
