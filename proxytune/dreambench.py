"""Fetch DreamBench subjects (CC-BY-4.0) from the dataset's public GitHub repository."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from proxytune.errors import ProxytuneError
from proxytune.files import write_bytes_atomic

REPO = "google/dreambooth"
LISTING = "https://api.github.com/repos/{repo}/contents/dataset/{name}"
SUBJECTS = (
    "backpack backpack_dog bear_plushie berry_bowl can candle cat cat2 clock colorful_sneaker dog dog2 dog3 dog5 "
    "dog6 dog7 dog8 duck_toy fancy_boot grey_sloth_plushie monster_toy pink_sunglasses poop_emoji rc_car "
    "red_cartoon robot_toy shiny_sneaker teapot vase wolf_plushie"
).split()


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise ProxytuneError(f"{url}: download failed ({err}); set PROXYTUNE_DREAMBENCH to a local copy instead") from None


def listing_url(name: str) -> str:
    """GitHub's folder listing, or $PROXYTUNE_DREAMBENCH_LISTING (a mirror; tests use a local server)."""
    return os.environ.get("PROXYTUNE_DREAMBENCH_LISTING", LISTING).format(repo=REPO, name=name)


def download(dest: Path, subjects: list[str] | None = None):
    """Download subjects into dest/NAME/*.jpg (files already present are kept); yields (name, count)."""
    for name in subjects or SUBJECTS:
        if name not in SUBJECTS:
            raise ProxytuneError(f"--subject: unknown DreamBench subject {name!r}")
        listing = json.loads(_get(listing_url(name)))
        files = [entry for entry in listing if entry.get("type") == "file" and entry["name"].lower().endswith((".jpg", ".jpeg", ".png"))]
        for entry in tqdm(files, desc=name, unit="img", leave=False):
            target = dest / name / entry["name"]
            if not target.exists():
                write_bytes_atomic(target, _get(entry["download_url"]))
        yield name, len(files)
    write_bytes_atomic(dest / "LICENSE.txt", b"DreamBench images: CC-BY-4.0, see https://github.com/google/dreambooth\n")
