"""The toy world's rendering styles (issue 15 item 5): default renders unchanged, the style detector, the
oracle's content leakage, toy style references in a spec and on the command line."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from proxytune.toyworld import styles, world
from proxytune.toyworld.subjects import SUBJECTS, reference_images

# sha256 of sample_world(64, seed 7) followed by every subject's references (sorted by name), computed on the
# commit before the styles existed (0a296e9): the data every shipped model was pretrained on is made by
# this sampler and renderer, and the shipped weights' digests depend on it.
DEFAULT_RENDERS_DIGEST = "49fae81367156d48dce602dd360e2f0aecb433bcce614bcfac52e57c4ec1cde4"


def test_styles_leave_the_worlds_default_renders_byte_identical():
    digest = hashlib.sha256()
    images, samples = world.sample_world(64, 7)
    digest.update(images.tobytes())
    for name in sorted(SUBJECTS):
        for image in reference_images(SUBJECTS[name]):
            digest.update(image.tobytes())
    assert digest.hexdigest() == DEFAULT_RENDERS_DIGEST
    # a styled render is the default render post-processed: no style is the render itself, and styling
    # never touches the array it is given
    sample = samples[0]
    plain = world.render(sample.attrs, sample.layout)
    assert np.array_equal(styles.render_styled(sample.attrs, sample.layout, None), plain)
    kept = plain.copy()
    for style in styles.STYLES:
        styled = styles.render_styled(sample.attrs, sample.layout, style)
        assert np.abs(styled.astype(int) - plain.astype(int)).mean() > 1.0, style
        styles.stylise(plain, style, mask=styles.object_mask(sample.attrs, sample.layout))
        assert np.array_equal(plain, kept)
    with pytest.raises(ValueError, match="not one of"):
        styles.stylise(plain, "watercolour")
    with pytest.raises(ValueError, match="mask"):
        styles.stylise(plain, "outline")


@pytest.mark.parametrize("style", styles.STYLES)
def test_the_detector_separates_styled_from_unstyled_renders(style):
    assert styles.detector_accuracy(style, n=200) >= 0.95  # outline: 96.5 % (pastel, grain: 100 %)
    # and it is style-specific: another style's renders do not read as this one
    other = next(s for s in styles.STYLES if s != style)
    images, _ = styles.styled_world(50, 78, other)
    assert styles.detects(images, style).mean() <= 0.1


def test_the_references_show_their_content_in_their_style():
    for style in styles.STYLES:
        refs = np.stack(styles.reference_images(style))
        assert styles.detects(refs, style).all(), style
    assert world.parse_prompt(styles.CONTENT_CAPTION) == {"cls": "ball", "colour": "red", "scene": "beach"}


def test_eval_prompts_ask_for_other_content_and_skip_curation_prompts():
    first = styles.eval_prompts(10, 3)
    assert first == styles.eval_prompts(10, 3) and len(set(first)) == 10
    for prompt in first:
        assert styles.leak_keys(prompt) == ["cls", "colour", "scene"], prompt
    assert first[0] not in styles.eval_prompts(10, 3, exclude={first[0]})


def test_content_leakage_separates_a_copying_model_from_a_non_copying_one():
    """The oracle reads every image: a 'copying' model returns the references (a red ball on the beach)
    whatever the prompt asks; a 'non-copying' one returns fresh renders of the prompt, in the style."""
    from proxytune.toyworld.oracle import shipped_reader as oracle_reader
    from proxytune.toyworld.style_metrics import toy_style_scores

    read = oracle_reader()
    prompts = styles.eval_prompts(8, 5)
    references = [Image.fromarray(image) for image in styles.reference_images("outline")]
    copying = [references[i % len(references)] for i in range(len(prompts))]
    rng = np.random.default_rng(9)
    fair = []
    for prompt in prompts:
        asked = world.parse_prompt(prompt)
        attrs = world.Attributes(asked["cls"], asked["colour"], scene=asked["scene"])
        fair.append(Image.fromarray(styles.render_styled(attrs, world.sample_layout(rng, attrs), "outline")))
    copy_scores = toy_style_scores(read, copying, prompts, "outline")
    fair_scores = toy_style_scores(read, fair, prompts, "outline")
    assert copy_scores["content_leak"].mean() >= 0.9 and fair_scores["content_leak"].mean() <= 0.1
    # the oracle, trained on unstyled renders, misreads some outlined ones (6 px of ink change a silhouette)
    assert fair_scores["prompt_acc"].mean() >= 0.8 and copy_scores["prompt_acc"].mean() <= 0.1
    assert copy_scores["style_acc"].mean() == 1.0 and fair_scores["style_acc"].mean() >= 0.75
    plain = toy_style_scores(read, [Image.fromarray(world.render(world.Attributes("box", "blue", scene="snow"),
                                                                   world.Layout(0.3, 0.5, 0.6, 1)))],
                             ["a blue box in the snow"], "outline")
    assert plain["style_acc"].tolist() == [0.0] and plain["content_leak"].tolist() == [0.0]


def test_a_toy_style_spec_resolves_its_references_and_refuses_an_unknown_style(tmp_path, monkeypatch):
    from proxytune.cli import main
    from proxytune.spec import load_spec
    from proxytune.spec.style import resolve_style

    monkeypatch.setenv("PROXYTUNE_HOME", str(tmp_path / "home"))
    text = (
        "name: t\nstyles:\n  - name: ink\n    images: toyworld:outline\n    prompts: [a red box]\n    raw: {ratio: 0}\n"
        "teacher: {model: toy-sd, resolution: 64}\nstudent: {model: toy-llamagen}\n"
        "style_student: {clip_model: toy-clip}\n"
    )
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    assert spec.styles[0].toy_style == "outline"
    folder, raw, prompts = resolve_style(spec.styles[0], spec_path, 0)
    written = sorted(folder.glob("*.png"))
    assert len(written) == 4 and raw is None and prompts == ["a red box"]
    assert np.array_equal(np.asarray(Image.open(written[0]).convert("RGB")), styles.reference_images("outline")[0])
    spec_path.write_text(text.replace("toyworld:outline", "toyworld:watercolour"))
    result = CliRunner().invoke(main, ["validate", str(spec_path)])
    assert result.exit_code == 2
    assert "styles[0].images" in result.output and "watercolour" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_toyworld_styles_command_writes_reference_folders(tmp_path):
    from proxytune.cli import main

    result = CliRunner().invoke(main, ["toyworld", "styles", "--out", str(tmp_path), "--style", "pastel"])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "pastel").glob("*.png"))
    assert len(written) == 4 and not (tmp_path / "outline").exists()
    assert styles.detects([Image.open(p) for p in written], "pastel").all()
    bad = CliRunner().invoke(main, ["toyworld", "styles", "--out", str(tmp_path), "--style", "sepia"])
    assert bad.exit_code == 2 and "--style 'sepia'" in bad.output
