"""Rendering styles of the toy world (StyleAR on a CPU, issue 15 item 5) and a model-free style detector.

A style is a post-process of a finished render: `stylise(image, style, mask, seed)` takes the world's
64 px picture (and, for `outline`, the mask of the object and its accessory) and returns a new array.
`render` itself is untouched, so every default render, and with them the data every shipped model was
trained on, stays byte-identical (tests/test_toy_styles.py pins a digest).

Styles (none of them ever appears in pretraining data):

* pastel: every pixel pulled 45 % of the way to a warm white, 255 * 0.45 + 0.55 * x: a washed, light
  palette with no dark pixel left (the world always has dark ones: its 1 px object outline).
* outline: a 6 px ring of dark ink (20, 16, 16) around the object and its accessory (5 px outside the
  silhouette, 1 px inside, covering the world's own 1 px outline): the ink-drawing style. The toy
  generators' autoencoders were trained on the world's dark colours (its outline, hats, black
  patterns), so unlike a new palette they can draw it.
* grain: film grain, monochrome Gaussian noise of std 14 per pixel (seeded by the layout), the texture
  kind of style; 8x8-cell autoencoders blur it away, so it is the hard case for the toy generators.

The detector (`style_score`) reads one statistic per style off the pixels, no model involved:

* pastel: the 2nd percentile of the per-pixel minimum channel (bright everywhere -> high);
* outline: the number of pixels in dark bands 3 to 9 px wide: dark (every channel <= 70, channels within
  25 of each other), kept by an opening (3x3 erosion then dilation: the default 1 px outline goes), with a
  non-dark pixel 5 px away on both sides (horizontally or vertically), which rules out wide dark areas
  (night ground, black stripes, a hat's crown). Ring width, band width and threshold come from a sweep on
  150 + 150 renders and their round trips through toy-llamagen's VQ and toy-sd's VAE (what the generators
  can draw at best). At the threshold 120: renders 95.0 / 96.5 / 95.0 / 97.5 % correct (that set and three
  fresh 200 + 200 samples); VQ round trips 73 % (45 % of styled ones found, 0 % of plain ones), VAE round
  trips 83 % (66 % / 0.7 %). A 4 px ring, or no opening, gave at most 86 % on VQ round trips with renders
  under 95 %. A found outline means one; a missed one may still be there, blurred by the autoencoder;
* grain: the median absolute difference between each pixel and the mean of its 3x3 neighbourhood
  (flat regions of a default render give 0; edges are a minority, so the median ignores them).

`detects(images, style)` thresholds the score at THRESHOLDS[style] (pastel, grain: about halfway between
the two classes on renders; outline: as above), checked on fresh renders (`detector_accuracy`, >= 95 % required by the tests).

Style references (`reference_images`, `proxytune toyworld styles --out DIR`) show one fixed piece of
content, a red ball on the beach (CONTENT), in the style, at four layouts: content leakage is then the
oracle finding the ball, the red or the beach in an image whose prompt asks for another class, colour
and scene (`leakage`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proxytune.toyworld import world

STYLES = ("outline", "pastel", "grain")
HELD_OUT_STYLE = "outline"  # the toy style experiment's (specs/toy-style.yaml)
_PASTEL_WHITE = np.array((255, 246, 236), dtype=np.float32)
_PASTEL_MIX = 0.45
_INK = np.array((20, 16, 16), dtype=np.float32)
_GRAIN_STD = 14.0
THRESHOLDS = {"pastel": 90.0, "outline": 120.0, "grain": 4.0}
DESCRIPTIONS = {
    "pastel": "2nd percentile of the per-pixel minimum channel (0-255); styled above 90",
    "outline": "pixels in 3-9 px wide dark bands (see proxytune.toyworld.styles); styled above 120",
    "grain": "median |pixel - mean of its 3x3 neighbourhood| (0-255, mean over channels); styled above 4",
}

# What every style reference shows: a red plain ball on the beach, no accessory.
CONTENT = world.Attributes("ball", "red", "plain", "none", "beach")
CONTENT_CAPTION = "a red ball on the beach"
_SHOOT = ((0.30, 0.50, 0.58), (0.26, 0.34, 0.62), (0.34, 0.62, 0.56), (0.28, 0.44, 0.66))


def object_mask(attrs: world.Attributes, layout: world.Layout) -> np.ndarray:
    """(64, 64) bool: the pixels the object or its accessory covers (half or more of the 2x canvas)."""
    canvas = np.zeros((world._CANVAS, world._CANVAS, 3), dtype=np.float32)
    world._draw_accessory(canvas, attrs.accessory, attrs.cls, layout.cx, layout.cy, layout.size)
    covered = world._shape_mask(attrs.cls, layout.cx, layout.cy, layout.size) | (canvas.sum(-1) > 0)
    small = covered.reshape(world.IMAGE_SIZE, world._SCALE, world.IMAGE_SIZE, world._SCALE).mean(axis=(1, 3))
    return small >= 0.5


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def stylise(image: np.ndarray, style: str, *, mask: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """A styled copy of a (64, 64, 3) uint8 render (the input is not modified).

    Args:
        image: the world's render.
        style: one of STYLES.
        mask: the object's mask (`object_mask`); required by `outline`.
        seed: seed of the grain.

    Raises:
        ValueError: an unknown style, or `outline` without a mask.
    """
    x = image.astype(np.float32)
    if style == "pastel":
        out = _PASTEL_MIX * _PASTEL_WHITE + (1 - _PASTEL_MIX) * x
    elif style == "outline":
        if mask is None:
            raise ValueError("the outline style needs the object's mask")
        ring = _dilate(mask, 5) & ~world._erode(mask, 1)  # 5 px outside, 1 px inside the silhouette
        out = x.copy()
        out[ring] = _INK
    elif style == "grain":
        noise = np.random.default_rng(seed).normal(0.0, _GRAIN_STD, size=x.shape[:2])[..., None]
        out = x + noise
    else:
        raise ValueError(f"style {style!r} is not one of {', '.join(STYLES)}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_styled(attrs: world.Attributes, layout: world.Layout, style: str | None) -> np.ndarray:
    """`world.render(attrs, layout)`, then `style` (None: the default render itself)."""
    image = world.render(attrs, layout)
    if style is None:
        return image
    mask = object_mask(attrs, layout) if style == "outline" else None
    return stylise(image, style, mask=mask, seed=layout.seed)


def styled_world(n: int, seed: int, style: str | None) -> tuple[np.ndarray, list[world.Attributes]]:
    """`n` fresh renders (the world's sampler, seed `seed`), styled: (n, 64, 64, 3) uint8 and their attributes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    attrs = []
    for i in range(n):
        a = world.sample_attributes(rng)
        images[i] = render_styled(a, world.sample_layout(rng, a), style)
        attrs.append(a)
    return images, attrs


# -----------------------------------------------------------------------------
# the detector


def _arrays(images) -> np.ndarray:
    """PIL images or an (N, H, W, 3) uint8 array -> (N, 64, 64, 3) float32."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        return images.astype(np.float32)
    size = (world.IMAGE_SIZE,) * 2
    return np.stack([np.asarray(im.convert("RGB").resize(size, Image.BICUBIC) if im.size != size else im.convert("RGB"),
                                dtype=np.float32) for im in images])


def _band_pixels(image: np.ndarray) -> int:
    """Pixels of `image` (64, 64, 3 float) in dark bands 3 to 9 px wide (the outline detector)."""
    dark = (image.max(axis=-1) <= 70) & (np.ptp(image, axis=-1) <= 25)
    thick = _dilate(world._erode(dark, 1), 1) & dark  # opening: drops dark parts under 3 px (the default outline)
    d, (h, w) = 5, dark.shape
    light = np.pad(~dark, d, constant_values=False)
    across = ((light[d : d + h, :w] & light[d : d + h, 2 * d : 2 * d + w])
              | (light[:h, d : d + w] & light[2 * d : 2 * d + h, d : d + w]))
    return int((thick & across).sum())


def style_score(images, style: str) -> np.ndarray:
    """(N,) the detector's statistic of `style` for each image (higher = more of the style)."""
    x = _arrays(images)
    if style == "pastel":
        return np.percentile(x.min(axis=-1).reshape(len(x), -1), 2, axis=1)
    if style == "outline":
        return np.array([_band_pixels(image) for image in x], dtype=np.float64)
    if style == "grain":
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        h, w = x.shape[1:3]
        local = sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
        return np.median(np.abs(x - local).mean(axis=-1).reshape(len(x), -1), axis=1)
    raise ValueError(f"style {style!r} is not one of {', '.join(STYLES)}")


def detects(images, style: str) -> np.ndarray:
    """(N,) bool: the detector says the image is in `style`."""
    return style_score(images, style) > THRESHOLDS[style]


def detector_accuracy(style: str, n: int = 200, seed: int = 4242) -> float:
    """Accuracy of `detects` on n fresh renders in `style` and n without (other renders, same sampler)."""
    styled, _ = styled_world(n, seed, style)
    plain, _ = styled_world(n, seed + 1, None)
    return float((detects(styled, style).sum() + (~detects(plain, style)).sum()) / (2 * n))


# -----------------------------------------------------------------------------
# references and content leakage


def reference_images(style: str) -> list[np.ndarray]:
    """The style's 4 references: CONTENT (a red ball on the beach) at four layouts, in `style`."""
    return [render_styled(CONTENT, world.Layout(size=s, cx=cx, cy=cy, seed=7000 + k), style)
            for k, (s, cx, cy) in enumerate(_SHOOT)]


def write_references(out: Path, names: list[str] | None = None) -> list[Path]:
    """Write each style's references as PNGs into out/NAME/ (a normal style reference folder)."""
    from PIL import Image

    from proxytune.files import write_png_atomic

    folders = []
    for name in names or list(STYLES):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(reference_images(name)):
            write_png_atomic(folder / f"{k:02d}.png", Image.fromarray(image))
        folders.append(folder)
    return folders


def reference_digest(name: str) -> str:
    from proxytune.toyworld.subjects import pixels_digest

    return pixels_digest(f"style:{name}", reference_images(name))


def reference_folder(name: str) -> Path:
    """The style's reference folder in the model cache, written once (atomically) and then reused.

    Raises:
        KeyError: `name` is not one of STYLES.
    """
    from proxytune.toyworld.subjects import cached_references

    if name not in STYLES:
        raise KeyError(name)
    return cached_references("style", name, reference_digest(name), lambda tmp: write_references(tmp, [name]))


LEAK_KEYS = ("cls", "colour", "scene")


def leak_keys(prompt: str) -> list[str]:
    """The content attributes of the references that an image for `prompt` must not show: those the
    prompt asks for with another value ("a blue box in the snow" -> cls, colour, scene)."""
    asked = world.parse_prompt(prompt)
    return [k for k in LEAK_KEYS if k in asked and asked[k] != getattr(CONTENT, k)]


def leakage(seen: dict[str, str], prompt: str) -> float | None:
    """Fraction of `leak_keys(prompt)` where the oracle reads the references' value instead (None: none)."""
    keys = leak_keys(prompt)
    if not keys:
        return None
    return sum(seen[k] == getattr(CONTENT, k) for k in keys) / len(keys)


def eval_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct prompts "a COLOUR CLASS SCENE" that name a class, colour and scene other than the
    references' (so leakage is defined for every attribute) and none of `exclude` (curation prompts)."""
    rng = np.random.default_rng(seed)
    classes = [c for c in world.CLASSES if c != CONTENT.cls]
    colours = [c for c in world.COLOURS if c != CONTENT.colour]
    scenes = [s for s in world.SCENES if s not in (CONTENT.scene, "studio")]
    out: list[str] = []
    for _ in range(100 * n):
        prompt = (f"a {colours[rng.integers(len(colours))]} {classes[rng.integers(len(classes))]} "
                  f"{world.SCENE_PHRASES[scenes[rng.integers(len(scenes))]]}")
        if prompt not in out and prompt not in exclude:
            out.append(prompt)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct evaluation prompts")  # pragma: no cover - 4 x 5 x 5 = 100 exist
