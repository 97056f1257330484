"""A wider hostile corpus (issue 12): what an attacker or a tired user puts in a spec or a reference folder.

Refused: one line naming the file and key, exit 2, no traceback, nothing written. Unusual but valid
images (CMYK, 16-bit, transparency, EXIF rotation, odd sizes) are accepted and load as the RGB picture
they show."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import copy_images
from proxytune.cli import main
from proxytune.images import center_crop_resize, load_references, open_rgb

HEAD = """name: t
subjects:
  - name: dog
    class: dog
    images: {images}
teacher:
  model: tiny-sd
evaluation: {{clip_model: tiny-clip, dino_model: tiny-dino}}
"""


def spec_text(images: str = "dreambench:dog") -> str:
    return HEAD.format(images=images)


def write_spec(project: Path, content: str | bytes, name: str = "t.yaml") -> Path:
    path = project / "specs" / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def refused(project: Path, command: str, path: Path, *words: str) -> str:
    before = sorted(p.name for p in project.iterdir())
    result = CliRunner().invoke(main, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in project.iterdir()) == before  # no dvc.yaml, runs/, .dvc/, registry/, lock
    return lines[0]


COMMANDS = pytest.mark.parametrize("command", ["validate", "apply"])


# -- the spec file -------------------------------------------------------------------------------------
@COMMANDS
def test_python_object_tag_is_refused_and_never_constructed(project, command):
    text = spec_text().replace("model: tiny-sd", "model: !!python/object/apply:os.system [touch pwned]")
    path = write_spec(project, text)
    refused(project, command, path, "teacher.model: line 7, column 10: YAML tag !!python/object/apply:os.system is not allowed")
    assert not (project / "pwned").exists()


@COMMANDS
def test_custom_and_binary_tags_are_refused(project, command):
    path = write_spec(project, spec_text().replace("name: t\n", "name: !shell t\n"))
    refused(project, command, path, "name: line 1, column 7: YAML tag !shell is not allowed")
    path = write_spec(project, spec_text().replace("class: dog", "class: !!binary ZG9n"))
    refused(project, command, path, "subjects[0].class: ", "YAML tag !!binary is not allowed")


def billion_laughs(levels: int = 9) -> str:
    lines = ["laughs:", "  a: &a [" + ", ".join(["lol"] * 9) + "]"]
    previous = "a"
    for name in "bcdefghij"[: levels - 1]:
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = name
    return "\n".join(lines) + "\n"


@COMMANDS
def test_alias_bomb_is_refused_before_anything_expands_it(project, command):
    path = write_spec(project, spec_text() + billion_laughs())  # 9**9 = 387 million "lol"s once expanded
    refused(project, command, path, "laughs.f: line 15: YAML aliases expand to more than 100000 values (an alias bomb?)")


@COMMANDS
def test_a_recursive_alias_is_refused(project, command):
    path = write_spec(project, spec_text() + "synthesis:\n  templates: &t [\"a {token} {class}\", *t]\n")
    refused(project, command, path, "synthesis.templates: line 10: a YAML alias refers to a value that contains it")


def test_ordinary_aliases_still_work(project):
    text = spec_text().replace("teacher:\n  model: tiny-sd\n", "teacher:\n  model: tiny-sd\n  lora: &lora {rank: 4, alpha: 4}\n")
    text += "student:\n  lora: *lora\n"
    path = write_spec(project, text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@COMMANDS
def test_non_utf8_bytes_name_the_key_and_line(project, command):
    path = write_spec(project, spec_text().replace("class: dog", "class: d\xe9g").encode("latin-1"))
    refused(project, command, path, "subjects[0].class: line 4, column 13: not UTF-8 text (byte 0xe9); save the spec as UTF-8")


@COMMANDS
def test_a_utf16_spec_is_refused(project, command):
    path = write_spec(project, spec_text().encode("utf-16"))
    refused(project, command, path, "line 1, column 1: not UTF-8 text (byte 0xff)")


@COMMANDS
def test_deep_nesting_is_refused(project, command):
    path = write_spec(project, spec_text() + "deep: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(project, command, path, "malformed YAML: nested too deeply for a spec")


@COMMANDS
def test_spec_that_is_a_symlink_loop(project, command):
    path = project / "specs" / "loop.yaml"
    path.symlink_to(path)
    refused(project, command, path, "cannot read spec (a symlink loop)")


@COMMANDS
def test_an_oversized_spec_is_refused_unread(project, command):
    path = write_spec(project, spec_text() + "# " + "x" * (2 << 20) + "\n")
    refused(project, command, path, "cannot read spec (2.0 MiB; a spec is a few KB, at most 1 MiB)")


# -- the reference folder ------------------------------------------------------------------------------
def refs_with(project: Path, photos: Path, name: str, content: bytes | None = None) -> Path:
    refs = copy_images(photos / "dog", project / "refs", count=2)
    if content is not None:
        (refs / name).write_bytes(content)
    return refs


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise(width: int = 120, height: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@COMMANDS
@pytest.mark.parametrize("name,content", [
    ("empty.jpg", b""),
    ("empty.png", b""),
    ("truncated.jpg", jpeg_bytes(noise())[:2000]),
    ("truncated.png", png_bytes(noise())[:5000]),
    ("header-only.png", png_bytes(noise())[:33]),
], ids=["zero-byte-jpg", "zero-byte-png", "truncated-jpg", "truncated-png", "png-header-only"])
def test_broken_images_are_refused(project, photos, command, name, content):
    refs_with(project, photos, name, content)
    path = write_spec(project, spec_text("../refs"))
    refused(project, command, path, "subjects[0].images: ", f"{name}: not a readable image")


@COMMANDS
def test_symlink_loop_among_the_references(project, photos, command):
    refs = refs_with(project, photos, "x")
    (refs / "loop.jpg").symlink_to(refs / "loop.jpg")
    path = write_spec(project, spec_text("../refs"))
    refused(project, command, path, "subjects[0].images: ", "loop.jpg: a broken symlink or a symlink loop, not an image")


@COMMANDS
def test_reference_folder_that_is_a_symlink_loop(project, command):
    (project / "refs").symlink_to(project / "refs")
    path = write_spec(project, spec_text("../refs"))
    refused(project, command, path, "subjects[0].images: ", "refs is a symlink loop")


# -- unusual but valid images ------------------------------------------------------------------------------
def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow writes none), pixels (H, W, 3) uint16."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20, left half red and right half blue, with EXIF orientation 6 (display rotated 90 degrees
    clockwise): upright it is 20x40, red on top."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(stored, exif=exif.tobytes())


def rgba_cutout() -> bytes:
    """Transparent black around an opaque red square, and one half-transparent blue pixel."""
    image = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (10, 10, 20, 20))
    image.putpixel((0, 29), (0, 0, 255, 128))
    return png_bytes(image)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 200, 0])
    image.paste(1, (4, 0, 8, 8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


GREY16 = np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32  # 0 .. 65504


def unusual_images() -> dict[str, bytes]:
    rgb16 = np.zeros((10, 12, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 0  # 8-bit (255, 128, 0)
    return {
        "cmyk.jpg": jpeg_bytes(Image.new("CMYK", (48, 32), (0, 255, 255, 0))),  # red
        "grey16.png": png_bytes(Image.fromarray(GREY16.astype(np.uint16))),
        "rgb16.png": png16_rgb(rgb16),
        "rgba.png": rgba_cutout(),
        "grey-alpha.png": png_bytes(Image.new("LA", (6, 6), (40, 0))),
        "palette-transparent.png": palette_with_transparency(),
        "rotated.jpg": exif_rotated_jpeg(),
        "odd.png": png_bytes(noise(333, 97)),
        "one-pixel.png": png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))),
        "bilevel.png": png_bytes(Image.new("1", (9, 7), 1)),
    }


@pytest.fixture
def unusual(tmp_path) -> Path:
    folder = tmp_path / "unusual"
    folder.mkdir()
    for name, content in unusual_images().items():
        (folder / name).write_bytes(content)
    return folder


def rgb(folder: Path, name: str) -> np.ndarray:
    image = open_rgb(folder / name)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_cmyk_jpeg_loads_as_its_colour(unusual):
    pixels = rgb(unusual, "cmyk.jpg")
    assert pixels.shape == (32, 48, 3)
    assert np.abs(pixels[16, 24] - [255, 0, 0]).max() <= 3


def test_16_bit_pngs_keep_their_tones(unusual):
    grey = rgb(unusual, "grey16.png")
    expected = np.rint(GREY16 / 257)
    assert np.abs(grey[..., 0] - expected).max() <= 1  # Pillow's own conversion clipped all but the darkest to 255
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(rgb(unusual, "rgb16.png") - [255, 128, 0]).max() <= 1


def test_transparency_is_composited_on_white(unusual):
    cutout = rgb(unusual, "rgba.png")
    assert (cutout[0, 0] == [255, 255, 255]).all()  # transparent black: white, not black
    assert (cutout[15, 15] == [255, 0, 0]).all()
    assert np.abs(cutout[29, 0] - [127, 127, 255]).max() <= 1  # half-transparent blue over white
    assert (rgb(unusual, "grey-alpha.png")[0, 0] == [255, 255, 255]).all()
    palette = rgb(unusual, "palette-transparent.png")
    assert (palette[0, 0] == [255, 255, 255]).all() and (palette[0, 7] == [0, 200, 0]).all()


def test_exif_rotated_jpeg_is_upright(unusual):
    pixels = rgb(unusual, "rotated.jpg")
    assert pixels.shape == (40, 20, 3)  # stored 40 wide, 20 high
    assert np.abs(pixels[5, 10] - [255, 0, 0]).max() <= 8 and np.abs(pixels[34, 10] - [0, 0, 255]).max() <= 8


def test_odd_and_tiny_sizes_crop_and_resize(unusual):
    odd = open_rgb(unusual / "odd.png")
    assert odd.size == (333, 97)
    assert center_crop_resize(odd, 64).size == (64, 64)
    assert np.asarray(open_rgb(unusual / "one-pixel.png"))[0, 0].tolist() == [1, 2, 3]
    assert (rgb(unusual, "bilevel.png") == 255).all()


def test_a_folder_of_unusual_images_validates_and_loads(project, unusual):
    path = write_spec(project, spec_text(str(unusual)))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    loaded = load_references(unusual, 64)
    assert len(loaded) == len(unusual_images())
    assert all(image.mode == "RGB" and image.size == (64, 64) for image in loaded)
