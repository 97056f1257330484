"""specs/profiles/: the paper's settings for one 24 GB and one 80 GB card validate, and `proxytune plan` says
their stages fit the card they are for (docs/profiles.md has the outputs)."""

from pathlib import Path

import pytest

from proxytune.plan import estimate
from proxytune.plan.gpus import find_gpu
from proxytune.plan.stages import plan_spec
from proxytune.spec import load_spec

PROFILES = Path(__file__).resolve().parents[1] / "specs" / "profiles"
CARDS = {"24gb": "RTX4090", "80gb": "H100-80GB"}


@pytest.fixture(scope="module", autouse=True)
def shared_traces(tmp_path_factory):
    """One trace cache for the module: the six profiles share three teachers' and students' traces."""
    folder = tmp_path_factory.mktemp("plan-traces")
    saved = estimate._cache_dir
    estimate._cache_dir = lambda: folder
    yield
    estimate._cache_dir = saved


def test_there_are_six_profiles():
    assert sorted(p.stem for p in PROFILES.glob("*.yaml")) == sorted(
        f"{pair}-{card}" for pair in ("sdxl-llamagen", "sdxl-lumina", "flux-lumina") for card in CARDS)


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.yaml")))
def test_profile_validates_and_fits_its_card(name):
    path = PROFILES / f"{name}.yaml"
    spec = load_spec(path)  # the spec loader: strict, every field checked
    assert spec.synthesis.num_images == 1000 and spec.evaluation.images_per_prompt == 4
    gpu = find_gpu(CARDS[name.rsplit("-", 1)[1]])
    plan = plan_spec(spec, str(path), PROFILES, gpu)
    over = {stage.stage for stage in plan.stages if not stage.fits}
    assert not over, [(s.stage, round(s.peak / estimate.GIB, 2)) for s in plan.stages]
