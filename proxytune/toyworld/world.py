"""A procedural world of coloured, patterned things in scenes, with captions, deterministic from a seed.

A picture is one object (a class, a body colour, a surface pattern in a second colour) at some size
and position, in a scene, optionally wearing an accessory. Everything is drawn with numpy on a
2x canvas and averaged down, so edges are anti-aliased and the 64 px image is a function of the
attributes, the layout and one seed alone.

Captions name the attributes in a fixed grammar ("a red box with white dots on the beach wearing a
hat"); training captions leave some attributes out at random, so that a prompt that does not name
a colour lets the model pick one, as "a S* box" must.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

IMAGE_SIZE = 64
_SCALE = 2  # drawn at 2x, then 2x2-averaged
_CANVAS = IMAGE_SIZE * _SCALE

CLASSES = ("box", "ball", "cone", "kite", "can")
COLOURS = {
    "red": (215, 35, 35),
    "yellow": (245, 215, 35),
    "green": (45, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 55, 185),
    "pink": (245, 125, 185),
}
PATTERN_COLOURS = {"white": (250, 250, 250), "black": (25, 25, 25)}
PATTERNS = ("plain", "dots", "stripes", "checks")
SCENES = ("studio", "snow", "beach", "jungle", "street", "night", "room")
ACCESSORIES = ("none", "hat", "crown", "flag")

SCENE_PHRASES = {
    "studio": "",
    "snow": "in the snow",
    "beach": "on the beach",
    "jungle": "in the jungle",
    "street": "on the street",
    "night": "at night",
    "room": "in a room",
}
ACCESSORY_PHRASES = {"none": "", "hat": "wearing a hat", "crown": "wearing a crown", "flag": "with a flag"}

# Every word a caption can hold (the toy tokenizer gives each one token).
VOCABULARY = tuple(
    sorted(
        set(CLASSES)
        | set(PATTERN_COLOURS)
        | set(PATTERNS)
        | {w for p in [*SCENE_PHRASES.values(), *ACCESSORY_PHRASES.values()] for w in p.split()}
        | {"a", "with", "photo", "of"}
    )
)


@dataclass(frozen=True)
class Attributes:
    """What a picture shows: what the oracle reads back and captions talk about."""

    cls: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = "none"  # "none" iff pattern == "plain"
    scene: str = "studio"
    accessory: str = "none"

    def __post_init__(self):
        checks = [
            ("cls", self.cls, CLASSES),
            ("colour", self.colour, tuple(COLOURS)),
            ("pattern", self.pattern, PATTERNS),
            ("scene", self.scene, SCENES),
            ("accessory", self.accessory, ACCESSORIES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if (self.pattern == "plain") != (self.pattern_colour == "none"):
            raise ValueError("pattern_colour must be 'none' exactly when pattern is 'plain'")
        if self.pattern != "plain" and (self.pattern_colour not in PATTERN_COLOURS or self.pattern_colour == self.colour):
            raise ValueError(f"pattern_colour {self.pattern_colour!r} must be a pattern colour other than the body colour")

    def identity(self) -> tuple[str, str, str, str]:
        """The object's own look, independent of where it stands and what it wears."""
        return (self.cls, self.colour, self.pattern, self.pattern_colour)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """Where the object stands (fractions of the image) and the seed of the scene's decoration."""

    size: float  # half-extent of the object, as a fraction of the image side
    cx: float
    cy: float
    seed: int


# -----------------------------------------------------------------------------
# sampling


def sample_attributes(rng: np.random.Generator, *, exclude: set[tuple] = frozenset()) -> Attributes:
    """Uniform over the world, re-drawn while the object's identity is in `exclude`."""
    while True:
        cls = CLASSES[rng.integers(len(CLASSES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        pcolour = "none"
        if pattern != "plain":
            choices = [c for c in PATTERN_COLOURS if c != colour]
            pcolour = choices[rng.integers(len(choices))]
        scene = SCENES[rng.integers(len(SCENES))]
        accessory = ACCESSORIES[rng.integers(len(ACCESSORIES))] if rng.random() < 0.5 else "none"
        attrs = Attributes(cls, colour, pattern, pcolour, scene, accessory)
        if attrs.identity() not in exclude:
            return attrs


def sample_layout(rng: np.random.Generator, attrs: Attributes, *, size: tuple[float, float] = (0.26, 0.36)) -> Layout:
    """A random size and position that keep the object (and its accessory) inside the frame."""
    s = float(rng.uniform(*size))
    top_room = s + (0.72 * s if attrs.accessory != "none" else 0.0) + 0.03
    cx = float(rng.uniform(s + 0.04, 1 - s - 0.04))
    lo, hi = max(top_room, 0.42), min(1 - s - 0.03, 0.7)
    cy = float(rng.uniform(lo, max(lo, hi)))
    return Layout(size=s, cx=cx, cy=cy, seed=int(rng.integers(2**31)))


def caption(attrs: Attributes, rng: np.random.Generator | None = None) -> str:
    """The caption of a picture; with `rng`, colour, pattern, scene or accessory may be left out."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() < p

    words = ["a"]
    if attrs.pattern == "plain" and rng is not None and rng.random() < 0.3:
        words.append("plain")
    if keep(0.85):
        words.append(attrs.colour)
    words.append(attrs.cls)
    if attrs.pattern != "plain" and keep(0.85):
        words += ["with", attrs.pattern_colour, attrs.pattern]
    if SCENE_PHRASES[attrs.scene] and keep(0.9):
        words.append(SCENE_PHRASES[attrs.scene])
    if ACCESSORY_PHRASES[attrs.accessory] and keep(0.95):
        words.append(ACCESSORY_PHRASES[attrs.accessory])
    return " ".join(words)


# -----------------------------------------------------------------------------
# prompts: what a prompt asks for


_SCENE_BY_PHRASE = {phrase: scene for scene, phrase in SCENE_PHRASES.items() if phrase}
_ACCESSORY_BY_PHRASE = {phrase: acc for acc, phrase in ACCESSORY_PHRASES.items() if phrase}


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt of the world's grammar asks for (identifier words are ignored).

    "a purple S* box on the beach" -> {"cls": "box", "colour": "purple", "scene": "beach"}.
    Unnamed attributes are absent; a prompt with no class word gives {}.
    """
    text = " ".join(prompt.lower().split())
    asked: dict[str, str] = {}
    words = re.findall(r"[a-z]+", text)
    cls_at = next((i for i, w in enumerate(words) if w in CLASSES), None)
    if cls_at is None:
        return asked
    asked["cls"] = words[cls_at]
    before = [w for w in words[:cls_at] if w in COLOURS]
    if before:
        asked["colour"] = before[-1]
    if "plain" in words[:cls_at]:
        asked["pattern"] = "plain"
    match = re.search(r"\bwith (\w+) (dots|stripes|checks)\b", text)
    if match and match.group(1) in PATTERN_COLOURS:
        asked["pattern"], asked["pattern_colour"] = match.group(2), match.group(1)
    for phrase, scene in _SCENE_BY_PHRASE.items():
        if phrase in text:
            asked["scene"] = scene
    for phrase, acc in _ACCESSORY_BY_PHRASE.items():
        if phrase in text:
            asked["accessory"] = acc
    return asked


# -----------------------------------------------------------------------------
# drawing


def _grid() -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(_CANVAS, dtype=np.float32) + 0.5) / _CANVAS
    return np.meshgrid(c, c)  # x, y in (0, 1), y downwards


_X, _Y = _grid()


def _paint(canvas: np.ndarray, mask: np.ndarray, rgb) -> None:
    canvas[mask] = rgb


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (_X >= x0) & (_X <= x1) & (_Y >= y0) & (_Y <= y1)


def _draw_scene(canvas: np.ndarray, scene: str, rng: np.random.Generator) -> None:
    horizon = float(rng.uniform(0.5, 0.62))
    ground = _Y >= horizon
    shade = (1.0 - 0.15 * _Y)[..., None]  # a little vertical light falloff
    if scene == "studio":
        canvas[:] = np.array((208, 208, 212)) * shade
    elif scene == "snow":
        canvas[:] = np.array((165, 195, 228)) * shade
        _paint(canvas, ground, (240, 244, 250))
        for _ in range(int(rng.integers(15, 30))):
            _paint(canvas, _disc(rng.uniform(0, 1), rng.uniform(0, horizon), 0.012), (252, 252, 255))
    elif scene == "beach":
        canvas[:] = np.array((120, 190, 242)) * shade
        _paint(canvas, (_Y >= horizon - 0.14) & ~ground, (30, 105, 185))
        _paint(canvas, ground, (232, 212, 150))
        for _ in range(int(rng.integers(2, 5))):
            y = rng.uniform(horizon - 0.13, horizon - 0.02)
            _paint(canvas, _rect(rng.uniform(0, 0.8), y, rng.uniform(0.85, 1.2), y + 0.008), (200, 230, 250))
    elif scene == "jungle":
        canvas[:] = (28, 92, 38)
        for _ in range(int(rng.integers(10, 18))):
            cx, cy = rng.uniform(0, 1), rng.uniform(0, 1)
            rx, ry = rng.uniform(0.06, 0.14), rng.uniform(0.03, 0.07)
            tone = (70, 155, 55) if rng.random() < 0.5 else (18, 62, 24)
            _paint(canvas, ((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 <= 1, tone)
        _paint(canvas, _Y >= horizon + 0.2, (92, 70, 36))
    elif scene == "street":
        canvas[:] = (152, 118, 104)
        for _ in range(int(rng.integers(3, 6))):
            x, y = rng.uniform(0, 0.9), rng.uniform(0.05, horizon - 0.15)
            _paint(canvas, _rect(x, y, x + 0.09, y + 0.1), (60, 70, 90))
        _paint(canvas, ground, (88, 88, 94))
        y = (horizon + 1) / 2 + 0.08
        dashes = ((_X * 5 + rng.uniform(0, 1)) % 1.0) < 0.5
        _paint(canvas, dashes & (_Y >= y) & (_Y <= y + 0.02), (245, 245, 245))
    elif scene == "night":
        canvas[:] = (14, 20, 52)
        for _ in range(int(rng.integers(20, 35))):
            _paint(canvas, _disc(rng.uniform(0, 1), rng.uniform(0, horizon), 0.008), (250, 245, 200))
        side = 0.15 if rng.random() < 0.5 else 0.85
        _paint(canvas, _disc(side, 0.14, 0.08), (240, 238, 205))
        _paint(canvas, ground, (26, 30, 42))
    elif scene == "room":
        canvas[:] = np.array((226, 205, 168)) * shade
        _paint(canvas, ground, (140, 90, 50))
        offset = rng.uniform(0, 0.2)
        _paint(canvas, ground & (((_X + offset) % 0.2) < 0.012), (105, 66, 36))
    else:  # pragma: no cover - Attributes validates scenes
        raise ValueError(scene)


def _shape_mask(cls: str, cx: float, cy: float, h: float) -> np.ndarray:
    dx, dy = _X - cx, _Y - cy
    if cls == "box":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if cls == "ball":
        return dx**2 + dy**2 <= h * h
    if cls == "cone":  # apex up
        return (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2)
    if cls == "kite":  # a diamond, taller than wide
        return np.abs(dx) / (0.8 * h) + np.abs(dy) / h <= 1
    if cls == "can":  # a tall rectangle with a rim
        return (np.abs(dx) <= 0.62 * h) & (np.abs(dy) <= h)
    raise ValueError(cls)  # pragma: no cover


def _pattern_mask(pattern: str, cx: float, cy: float, h: float) -> np.ndarray:
    # Object-local: the pattern moves and scales with the object. Every feature is at least 10 px
    # (more than one 8x8 latent cell of the toy autoencoders); finer ones blurred into one colour.
    u, v = (_X - cx) / h, (_Y - cy) / h
    if pattern == "stripes":
        return ((u + 2) / 1.34 % 1.0) < 0.5  # vertical stripes, three across the object
    if pattern == "checks":
        return ((np.floor((u + 2) / 0.95) + np.floor((v + 2) / 0.95)) % 2) == 1  # about 2x2 squares
    if pattern == "dots":
        cell = 1.1  # big round dots on a grid with one at the centre, so every shape shows one
        fu, fv = (u / cell + 0.5) % 1.0 - 0.5, (v / cell + 0.5) % 1.0 - 0.5
        return fu**2 + fv**2 <= 0.3**2
    return np.zeros_like(_X, dtype=bool)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _draw_accessory(canvas: np.ndarray, accessory: str, cls: str, cx: float, cy: float, h: float) -> None:
    top = cy - h
    if accessory == "hat":
        _paint(canvas, _rect(cx - 0.5 * h, top - 0.06 * h, cx + 0.5 * h, top + 0.06 * h), (20, 20, 22))
        _paint(canvas, _rect(cx - 0.3 * h, top - 0.5 * h, cx + 0.3 * h, top), (20, 20, 22))
        _paint(canvas, _rect(cx - 0.3 * h, top - 0.16 * h, cx + 0.3 * h, top - 0.08 * h), (190, 30, 40))
    elif accessory == "crown":
        base = _rect(cx - 0.42 * h, top - 0.14 * h, cx + 0.42 * h, top + 0.04 * h)
        spikes = np.zeros_like(base)
        for k in (-1, 0, 1):
            px = cx + k * 0.32 * h
            spikes |= (_Y <= top - 0.14 * h) & (_Y >= top - 0.42 * h) & (np.abs(_X - px) <= (_Y - (top - 0.42 * h)) * 0.4)
        _paint(canvas, base | spikes, (235, 185, 30))
    elif accessory == "flag":
        px = cx + 0.1 * h
        _paint(canvas, _rect(px - 0.06 * h, top - 0.72 * h, px + 0.06 * h, top + 0.05 * h), (60, 50, 45))
        cloth = (_X >= px) & (_X <= px + 0.8 * h) & (np.abs(_Y - (top - 0.5 * h)) <= 0.21 * h * (1 - (_X - px) / (0.8 * h)))
        _paint(canvas, cloth, (225, 30, 40))
        _paint(canvas, cloth & ~_erode(cloth, 2), (30, 30, 30))


def render(attrs: Attributes, layout: Layout) -> np.ndarray:
    """(64, 64, 3) uint8 picture of `attrs` at `layout`."""
    rng = np.random.default_rng(layout.seed)
    canvas = np.zeros((_CANVAS, _CANVAS, 3), dtype=np.float32)
    _draw_scene(canvas, attrs.scene, rng)
    h, cx, cy = layout.size, layout.cx, layout.cy
    body = _shape_mask(attrs.cls, cx, cy, h)
    light = 1.0 + 0.18 * (cy - _Y) / h  # lit from above: a hint of volume
    colour = np.array(COLOURS[attrs.colour], dtype=np.float32)
    surface = np.broadcast_to(colour, canvas.shape).copy()
    if attrs.pattern != "plain":
        surface[_pattern_mask(attrs.pattern, cx, cy, h)] = PATTERN_COLOURS[attrs.pattern_colour]
    surface *= light[..., None]
    canvas[body] = surface[body]
    canvas[body & ~_erode(body, 2)] = (35, 30, 30)  # outline, so a green ball shows in the jungle
    if attrs.cls == "can":
        _paint(canvas, body & (np.abs(_Y - (cy - h)) <= 0.07 * h), (150, 150, 155))  # the lid
    _draw_accessory(canvas, attrs.accessory, attrs.cls, cx, cy, h)
    small = canvas.reshape(IMAGE_SIZE, _SCALE, IMAGE_SIZE, _SCALE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


@dataclass
class Sample:
    attrs: Attributes
    layout: Layout
    caption: str


def sample_world(n: int, seed: int, *, exclude: set[tuple] = frozenset(), full_captions: bool = False,
                 progress: str | None = None) -> tuple[np.ndarray, list[Sample]]:
    """`n` random pictures: (n, 64, 64, 3) uint8 and what each shows, deterministic in `seed`."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    samples = []
    for i in tqdm(range(n), desc=progress, disable=None if progress else True):
        attrs = sample_attributes(rng, exclude=exclude)
        layout = sample_layout(rng, attrs)
        text = caption(attrs, None if full_captions else rng)
        images[i] = render(attrs, layout)
        samples.append(Sample(attrs, layout, text))
    return images, samples


def with_scene(attrs: Attributes, scene: str, accessory: str = "none") -> Attributes:
    return replace(attrs, scene=scene, accessory=accessory)
