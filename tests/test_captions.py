"""LlamaGen's caption cleaning as a llamagen student applies it, identifiers checked against it, and
the student options that follow the original (dropout).

The expected cleanings were produced by the original's own function (LlamaGen language/t5.py,
T5Embedder.text_preprocessing with ftfy and BeautifulSoup installed) and are written out here."""

import types

import pytest
import yaml
from click.testing import CliRunner

from proxytune.backends.captions import clean_caption, identifier_problem
from proxytune.cli import main
from proxytune.errors import ProxytuneError
from proxytune.spec import load_spec

ORIGINAL_CLEANING = [
    ("a S* dog", "a s dog"),
    ("A <b>Bold</b> Photo of a Dog", "a bold photo of a dog"),
    ("Visit https://example.com/page now", "visit now"),
    ("@artist a cat, on a mat...", "a cat, on a mat"),
    ("IMG_2024.jpg a Red-Eyed tree frog", "a red-eyed tree frog"),
    ("a “quoted” dog — running", 'a "quoted" dog - running'),
    ("jc6640 backpack 1920x1080", "backpack"),
    ("a dog [sks] {x} | y", "a dog sks x y"),
    ('"a wrapped caption"', "a wrapped caption"),
    ("free shipping: sks dog", "sks dog"),
    ("a sks dog in the jungle", "a sks dog in the jungle"),
    ("a S* backpack on top of pink fabric", "a s backpack on top of pink fabric"),
    ("the-very-long-hyphenated-name dog", "the very long hyphenated name dog"),
    ("ｆｕｌｌｗｉｄｔｈ ﬁne", "fullwidth fine"),
    ("50% off #123 item 1234567", "50% off item"),
    ("a dog's toy", "a dog's toy"),
    ("x <script>alert(1)</script> y", "x y"),
    ("a <sks> dog", "a dog"),
    ("tab\there\r\nnewline", "tab here newline"),
]


@pytest.mark.parametrize(("caption", "expected"), ORIGINAL_CLEANING)
def test_cleaning_is_the_originals(caption, expected):
    assert clean_caption(caption) == expected
    assert clean_caption(expected) == expected  # a cleaned caption is a fixed point


@pytest.mark.parametrize(
    ("token", "level", "seen"),
    [("sks", None, None), ("SKS", None, None), ("ohwx", None, None),
     ("S*", "warning", "a s dog"), ("[V]", "warning", "a v dog"),
     ("<sks>", "error", "a dog"), ("@sks", "error", "a dog"), ("jc6640", "error", "a dog")],
)
def test_identifiers_are_checked_against_the_cleaning(token, level, seen):
    problem = identifier_problem(token, "dog")
    if level is None:
        assert problem is None
    else:
        assert problem[0] == level and repr(seen) in problem[1] and "'sks'" in problem[1]


def test_the_default_identifier_survives():
    from proxytune.spec.subject import SubjectSpec

    token = SubjectSpec(name="dog", class_noun="dog", images="x").token
    assert token == "sks" and clean_caption(f"a {token} dog") == f"a {token} dog"


def test_the_llamagen_student_cleans_its_prompts():
    """The tiny llamagen student encodes "a S* dog" exactly as "a s dog" (and may be told not to clean)."""
    import torch

    from proxytune.backends.students.llamagen import backend as llamagen

    bundle = llamagen.load_student("tiny-llamagen")
    assert bundle.config.clean_captions
    assert torch.equal(bundle.encode_prompts(["A S* Dog!!"]), bundle.encode_prompts(["a s dog!!"]))
    bundle.config.clean_captions = False
    assert not torch.equal(bundle.encode_prompts(["A S* Dog"]), bundle.encode_prompts(["a s dog"]))


# -----------------------------------------------------------------------------
# the spec


def spec_file(project, **changes):
    spec = {"name": "t", "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog"}],
            "teacher": {"model": "tiny-sd"}, "student": {"model": "tiny-llamagen"}}
    for section, value in changes.items():
        spec[section] = value
    path = project / "specs" / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_validate_refuses_an_identifier_the_cleaning_removes(project):
    subject = {"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "<sks>"}
    result = CliRunner().invoke(main, ["validate", str(spec_file(project, subjects=[subject]))])
    assert result.exit_code == 2
    assert "subjects[0].token: '<sks>' does not survive LlamaGen's caption cleaning" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # a student without the cleaning does not care
    ok = CliRunner().invoke(main, ["validate", str(spec_file(project, subjects=[subject], student={"model": "tiny-janus"}))])
    assert ok.exit_code == 0, ok.output


def test_validate_warns_about_an_identifier_the_cleaning_changes(project):
    subject = {"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "S*"}
    result = CliRunner().invoke(main, ["validate", str(spec_file(project, subjects=[subject]))])
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "subjects[0].token: 'S*' reaches the llamagen student changed" in result.stderr
    assert "'a s dog'" in result.stderr
    clean = CliRunner().invoke(main, ["validate", str(spec_file(project))])
    assert clean.exit_code == 0 and "warning" not in clean.stderr


def test_multi_subject_tokens_must_stay_distinct_after_cleaning(project):
    subjects = [{"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "V*"},
                {"name": "cat", "class": "cat", "images": "dreambench:cat", "token": "[V]"}]
    path = spec_file(project, subjects=subjects, student={"model": "tiny-llamagen", "multi_subject": True})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "subjects[1].token: '[V]' and subjects[0].token 'V*' both reach the llamagen student as 'v'" in result.output


@pytest.mark.parametrize("value", [1.5, -0.1, "lots"])
def test_student_dropout_is_validated(project, value):
    result = CliRunner().invoke(main, ["validate", str(spec_file(project, student={"dropout": value}))])
    assert result.exit_code == 2 and "student.dropout:" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_student_dropout_defaults_to_the_originals(project):
    from proxytune.backends.students.llamagen import backend as llamagen
    from proxytune.stages.student_setup import training_dropout

    assert load_spec(spec_file(project)).student.dropout is None
    bundle = llamagen.load_student("tiny-llamagen")
    assert training_dropout(bundle, None) == 0.1 and bundle.model.config.dropout == 0.1
    assert bundle.model.token_dropout.p == 0.1
    assert training_dropout(bundle, 0.0) == 0.0 and bundle.model.token_dropout.p == 0.0
    other = types.SimpleNamespace(backend="janus")
    assert training_dropout(other, None) == 0.0 and training_dropout(other, 0.0) == 0.0
    with pytest.raises(ProxytuneError, match="student.dropout: the janus backend has no dropout option"):
        training_dropout(other, 0.1)
