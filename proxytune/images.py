"""Reference images in, grids out: EXIF orientation, centre crop, resize, clear errors."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from proxytune.errors import ProxytuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files in `folder`, sorted by name.

    Raises:
        ProxytuneError: the folder is missing or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ProxytuneError(f"{folder}: reference folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ProxytuneError(f"{folder}: no reference images (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image fully, honour EXIF orientation, convert to RGB.

    Raises:
        ProxytuneError: the file is empty, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ProxytuneError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None


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
