"""Reference images in, grids out: EXIF orientation, centre crop, resize, clear errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from proxytune.errors import ProxytuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Pixels an image may declare before it is decoded: Pillow's own bomb threshold (about 89 Mpx, e.g.
# 10000 x 8900: more than any camera photo). A few-kilobyte PNG can declare 60000 x 60000 pixels, whose
# decoding would take gigabytes of memory; the header is read first and such a file refused.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def list_images(folder: str | Path) -> list[Path]:
    """Image files in `folder`, sorted by name.

    Raises:
        ProxytuneError: the folder is missing or unlistable, holds no images, or an image name is a broken
            symlink or a symlink loop.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ProxytuneError(f"{folder}: reference folder does not exist")
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as err:
        raise ProxytuneError(f"{folder}: cannot list the reference folder ({err.strerror or err})") from None
    files = []
    for path in entries:
        if path.is_file():
            files.append(path)
        elif path.is_symlink() and not path.exists():  # is_file() says False for these: say why instead
            raise ProxytuneError(f"{path}: a broken symlink or a symlink loop, not an image")
    if not files:
        raise ProxytuneError(f"{folder}: no reference images (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def is_readable(path: str | Path) -> bool:
    """Whether `path` opens fully as an image (`open_rgb` succeeds): a resumable stage's test for a
    file written before an interruption."""
    try:
        open_rgb(path)
        return True
    except ProxytuneError:
        return False


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image fully, honour EXIF orientation, convert to 8-bit RGB (see `to_rgb`).

    Raises:
        ProxytuneError: the file is empty, truncated, not an image, or declares more than MAX_PIXELS pixels.
    """

    def too_large(declared: str) -> ProxytuneError:
        return ProxytuneError(f"{path}: image declares {declared}, more than {MAX_PIXELS / 1e6:.0f} Mpx: refused before "
                              "decoding (a decompression bomb, or a photo to scale down)")

    try:
        with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise too_large(f"{width}x{height} pixels ({width * height / 1e6:.0f} Mpx)")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:  # Pillow refuses over twice its limit already on open
        match = re.search(r"\((\d+) pixels\)", str(err))
        raise too_large(f"{int(match.group(1)) / 1e6:.0f} Mpx" if match else "too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ProxytuneError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode Pillow opens: transparency is composited on white (a cut-out object on a white
    background, as DreamBench's photos are; dropping alpha would show whatever colour the transparent pixels
    hold, often black), 16- and 32-bit greyscale is scaled to 8 bits (Pillow's own conversion clips every
    value above 255 to white), CMYK, palette and the rest through Pillow's conversions."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # not from the suffixes proxytune reads; kept to 0..1 floats, as most writers do
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to size x size (bicubic)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.BICUBIC)


def load_references(folder: str | Path, size: int) -> list[Image.Image]:
    return [center_crop_resize(open_rgb(p), size) for p in list_images(folder)]


def grid(rows: list[list[Image.Image]], cell: int = 128, pad: int = 2) -> Image.Image:
    """Rows of images (any sizes) pasted into one white-padded picture of cell x cell tiles."""
    ncols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (ncols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image.resize((cell, cell), Image.BICUBIC), (pad + c * (cell + pad), pad + r * (cell + pad)))
    return canvas
