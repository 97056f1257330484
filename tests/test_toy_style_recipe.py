"""The shipped toy style recipe (specs/toy-style.yaml, issue 29 item 4): what its evaluation draws, and the
held-out prompt count it may ask for. Compiles the spec only; no stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxytune import builtins
from proxytune.errors import ProxytuneError
from proxytune.stages.style_evaluate import eval_prompts, style_world
from proxytune.toyworld import styles, world

from conftest import make_params

SPEC = Path(__file__).parents[1] / "specs" / "toy-style.yaml"


@pytest.fixture
def recipe(project):
    """The shipped recipe's compiled params, in a fresh project."""
    spec = yaml.safe_load(SPEC.read_text())
    return project, spec, make_params(project, spec, subject=spec["styles"][0]["name"])


def test_the_recipe_evaluates_distinct_held_out_prompts_that_are_no_curation_prompt(recipe):
    _, spec, params = recipe
    held_out_world, item = style_world(params)
    prompts = eval_prompts(params, held_out_world)
    assert item == "outline" and len(prompts) == spec["evaluation"]["num_prompts"] == len(set(prompts))
    assert not set(prompts) & set(params.style.prompts)
    for prompt in prompts:  # another class, colour and scene than the references' red ball on the beach
        assert styles.leak_keys(prompt) == ["cls", "colour", "scene"], prompt
    assert params.synthesis.lora_scale == spec["synthesis"]["lora_scale"]  # curation draws at the recipe's scale


def test_more_prompts_than_the_world_composes_is_refused_naming_the_key(recipe):
    project, spec, _ = recipe
    classes = len(world.CLASSES) - 1  # the references' class, colour and scene (and the plain studio) are left out
    available = classes * (len(world.COLOURS) - 1) * (len(world.SCENES) - 2)
    spec["evaluation"]["num_prompts"] = available + 1
    params = make_params(project, spec, subject=spec["styles"][0]["name"])
    with pytest.raises(ProxytuneError) as err:
        eval_prompts(params, builtins.world("toyworld"))
    message = str(err.value)
    assert "evaluation.num_prompts" in message and str(available + 1) in message and "\n" not in message
    assert message.startswith(str(params.source.spec_file))
