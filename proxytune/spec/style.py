"""Styles (StyleAR, issue 15): a style reference, the prompts its curated set is made from, the raw
text-image data mixed into the student's training, and the style student's own settings.

A style experiment runs, per style: teacher (a DreamBooth LoRA binding "a {class} in {token} style" to
the reference images) -> curation (the tuned teacher draws "PROMPT, in {token} style" for every
curation prompt; only (PROMPT, image) pairs are kept) -> style student (Lumina-mGPT or LlamaGen + a CLIP
image encoder and a perceiver resampler whose style tokens replace placeholders in the prompt, or caption
slots before the caption on LlamaGen) -> style
evaluation (style similarity, text alignment, content leakage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from proxytune.spec.common import (TINY_CLIP, PositiveFloat, PositiveInt, Probability, SafeName, ScoredCuration, Seed,
                                   Strict, model_ref_checker)
from proxytune.spec.subject import installed_world, toy_subject_name, world_ref

STYLE_INSTANCE_PROMPT = "a {class} in {token} style"  # what the style teacher learns on the references
STYLE_CURATION_PROMPT = "{prompt}, in {token} style"  # what the tuned teacher draws for each curation prompt


class PromptFile(Strict):
    """Curation prompts from a text file: one prompt per line; blank lines and lines starting with # skipped."""

    file: str = Field(min_length=1, description="Text file, relative to the spec file.")


class GeneratedPrompts(Strict):
    """Curation prompts composed from a built-in vocabulary (object, colour, setting), seeded."""

    generate: PositiveInt = Field(description="How many distinct prompts to compose.")
    vocabulary: Literal["objects", "toyworld"] = Field(
        default="objects",
        description="objects: everyday objects, animals and places ('a red bicycle by a lake'); toyworld: the toy "
        "world's captions (its classes, colours, patterns and scenes), for toy models.",
    )
    seed: Seed = Field(default=0, description="Seed of the composition.")


def _prompts_kind(value) -> str | None:
    if isinstance(value, (list, tuple)):
        return "[list]"
    if isinstance(value, dict):
        return "[generate]" if "generate" in value else "[file]" if "file" in value else None
    return {PromptFile: "[file]", GeneratedPrompts: "[generate]"}.get(type(value))


# The tags carry brackets so that error paths read styles[0].prompts.generate, not ...prompts.generate.generate.
CurationPrompts = Annotated[
    Union[Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), Tag("[list]")],
          Annotated[PromptFile, Tag("[file]")], Annotated[GeneratedPrompts, Tag("[generate]")]],
    Discriminator(_prompts_kind, custom_error_type="prompts",
                  custom_error_message="must be a list of prompts, {file: PATH} or {generate: N}"),
]


class RawDataSpec(Strict):
    """Raw (unstylised) text-image pairs mixed into the style student's training: StyleAR mixes raw and
    stylised images, 3:1 being its best ratio. Style tokens of a raw pair come from the raw image itself."""

    folder: str | None = Field(
        default=None,
        description="Folder of images with captions, relative to the spec file: metadata.jsonl (lines "
        "{\"file_name\": ..., \"text\": ...}, the Hugging Face imagefolder convention) or NAME.txt beside each NAME.png.",
    )
    toyworld: PositiveInt | None = Field(
        default=None, description="Use this many toy world renders (64 px, captioned by the world) instead of a folder.",
    )
    ratio: Annotated[float, Field(ge=0)] = Field(
        default=3.0, description="raw : stylised in the training mix (each training example is raw with probability "
        "ratio / (ratio + 1)). 0 trains on the curated set only and needs no raw data.",
    )
    max_images: PositiveInt | None = Field(default=None, description="Use only the first N raw pairs of a folder.")
    seed: Seed = Field(default=0, description="Seed of the toy world renders.")

    @model_validator(mode="after")
    def _one_source(self):
        if self.folder is not None and self.toyworld is not None:
            raise ValueError("set one of folder and toyworld, not both")
        if self.ratio > 0 and self.folder is None and self.toyworld is None:
            raise ValueError("raw data: set folder (images with captions) or toyworld (a number of renders), "
                             "or ratio: 0 to train on the curated set only")
        if self.toyworld is not None:
            installed_world("toyworld")
        return self


class StyleFidelitySpec(ScoredCuration):
    """Every stylised image of the curated set scored against the style references, and curation by it (issue 29)."""

    enabled: bool = Field(
        default=True,
        description="Score every stylised image: style similarity to the references (backends/style_metrics.py: "
        "style_clip, style_gram, with the evaluation's encoders) and, for a toy style, the style detector (0/1).")
    metric: Literal["style_clip", "style_gram"] = Field(
        default="style_clip",
        description="The score that ranks images: style_clip (CLIP image similarity to the references) or style_gram "
        "(Gram matrices of DINO patch tokens). On the toy world's outline style, the styled render of a picture "
        "outscores its plain render on style_clip 95 % of the time, on style_gram 35 % (docs/curation.md); "
        "style_clip also rewards the references' content, which the evaluation's leakage scores watch.")
    threshold: float = Field(default=0.5, ge=-1, le=1,
                             description="An image scoring above this counts as in style (reported share, gate).")
    min_share: Probability | None = Field(
        default=None, description="Gate: fail the curation stage when fewer kept images score above `threshold`.")
    keep: PositiveInt | None = Field(
        default=None,
        description="Curation: keep the best N of each prompt's images_per_prompt images (null: keep all).")
    diversity: float = Field(default=0.0, ge=0, lt=1,
                             description="Diversity weight of the pick within a prompt (as synthesis.fidelity).")


class StyleSpec(Strict):
    name: SafeName = Field(description="Style name; becomes a folder and part of registry names.")
    images: str = Field(
        min_length=1,
        description="Folder of one or more style reference images (JPEG/PNG), relative to the spec file, or "
        "'toyworld:NAME' for a rendering style of the toy world (outline, pastel, grain: references showing a red "
        "ball on the beach, written once into the model cache; evaluation adds the style detector's style "
        "accuracy and the oracle's prompt accuracy and content leakage).",
    )
    token: str = Field(default="sks", min_length=1, pattern=r"^\S+$",
                       description="Identifier bound to the style in the teacher's prompts ('a picture in sks style').")
    class_noun: str = Field(
        default="picture", alias="class", min_length=1,
        description="Noun of the teacher's instance prompt 'a {class} in {token} style' (and of its prior "
        "preservation prompt 'a {class}').",
    )
    content: str | None = Field(
        default=None,
        description="What the reference images show, as a caption ('a lighthouse on a cliff'): the content-leakage "
        "metric is the CLIP similarity of the student's images to it. null: leakage is measured by the DINO "
        "content similarity only.",
    )
    prompts: CurationPrompts = Field(
        description="Curation prompts, without the identifier: a list, {file: prompts.txt}, or "
        "{generate: N, vocabulary: objects|toyworld, seed: 0}. The curated set has images_per_prompt images of each.",
    )
    images_per_prompt: PositiveInt = Field(default=1, description="Curated images per prompt (seeds differ).")
    fidelity: StyleFidelitySpec = Field(default_factory=StyleFidelitySpec,
                                        description="Every stylised pair scored against the style references; "
                                        "curation keeps the best per prompt.")
    raw: RawDataSpec = Field(default_factory=dict, validate_default=True,
                             description="Raw text-image data mixed into training.")

    model_config = Strict.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _keep_fits(self):
        keep = self.fidelity.keep
        if keep is not None and keep > self.images_per_prompt:
            raise ValueError(f"fidelity.keep ({keep}) is more than images_per_prompt ({self.images_per_prompt}): "
                             "curation keeps the best `keep` of each prompt's images")
        return self

    @property
    def toy_style(self) -> str | None:
        """The world style's name when `images` is `WORLD:NAME` (toyworld:NAME), else None."""
        return toy_subject_name(self.images)  # the same `toyworld:NAME` form as a toy subject's

    @property
    def world(self) -> str | None:
        """The built-in world `images` names (`toyworld` for toyworld:NAME), else None."""
        ref = world_ref(self.images)
        return None if ref is None else ref[0]

    @field_validator("images")
    @classmethod
    def _known_toy_style(cls, value: str) -> str:
        ref = world_ref(value)
        if ref is not None:
            known = installed_world(ref[0], folder_hint=True).style_names()
            if ref[1] not in known:
                raise ValueError(f"unknown toy world style {ref[1]!r}; one of {', '.join(known)}")
        return value

    @field_validator("prompts")
    @classmethod
    def _no_identifier_braces(cls, value):
        if isinstance(value, list):
            for i, prompt in enumerate(value):
                if "{" in prompt or "}" in prompt:
                    raise ValueError(f"prompt {i} ({prompt!r}): no {{...}} fields; the identifier is added by curation")
        return value


ClipModel = Annotated[str, model_ref_checker(TINY_CLIP)]


class ResamplerSpec(Strict):
    """Perceiver resampler sizes (StyleAR's released one: depth 4, 12 heads of 64, width 4096 = the LM width)."""

    depth: PositiveInt = Field(default=4, description="Perceiver layers.")
    heads: PositiveInt = Field(default=12, description="Attention heads.")
    dim_head: PositiveInt = Field(default=64, description="Width of each head.")
    dim: PositiveInt | None = Field(default=None, description="Query width; null = the AR model's hidden width.")
    ff_mult: PositiveInt = Field(default=4, description="Feed-forward expansion.")


class StyleStudentSpec(Strict):
    """The style tokens of a style student (the rest comes from the `student` section: model, LoRA, steps,
    batch, learning rate, sampling)."""

    clip_model: ClipModel = Field(
        default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="Frozen CLIP image encoder whose penultimate hidden states feed the resampler (StyleAR: ViT-H/14).",
    )
    num_style_tokens: PositiveInt = Field(default=16, description="Style tokens = placeholders 'S*' in the prompt.")
    resampler: ResamplerSpec = Field(default_factory=ResamplerSpec, description="Perceiver resampler sizes.")
    resampler_lr: PositiveFloat | None = Field(default=None, description="Resampler learning rate (null = student.learning_rate).")
    noise_strength: Annotated[float, Field(ge=0)] = Field(
        default=0.3,
        description="Style-enhanced tokens: std of the Gaussian noise added to the style tokens at inference "
        "(StyleAR default 0.3); more noise, less content copied from the style image, weaker style.",
    )
    train_noise_strength: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="The same noise while training (0 = clean tokens, as the released inference assumes).",
    )
    eval_noise_strengths: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, description="Also evaluate the student at these noise strengths (leakage vs style curve).",
    )


# -- resolving a style's inputs (folders, prompt files, generated prompts) ---------------------------
_OBJECTS = ("cat", "dog", "house", "bicycle", "tree", "boat", "teapot", "horse", "car", "lighthouse", "chair",
            "bird", "castle", "violin", "mountain", "train", "owl", "bridge", "apple", "robot")
_COLOURS = ("", "red ", "blue ", "yellow ", "green ", "white ", "black ", "golden ")
_SETTINGS = ("", " by a lake", " in a forest", " in the city", " on a table", " at night", " in the snow",
             " on the beach", " under a tree", " in a field of flowers")


def generated_prompts(spec: GeneratedPrompts) -> list[str]:
    """`spec.generate` distinct prompts, deterministic in `spec.seed`.

    objects: "a {colour}{object}{setting}" from a built-in vocabulary (20 x 8 x 10 combinations);
    toyworld: the toy world's own captions (random attributes, layouts not rendered).

    Raises:
        ValueError: more prompts asked for than the vocabulary composes.
    """
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    if spec.vocabulary == "objects":
        combos = [f"{'an' if (c or o)[0] in 'aeiou' else 'a'} {c}{o}{s}" for o in _OBJECTS for c in _COLOURS for s in _SETTINGS]
        if spec.generate > len(combos):
            raise ValueError(f"generate: at most {len(combos)} prompts from the objects vocabulary")
        return [combos[i] for i in rng.permutation(len(combos))[: spec.generate]]
    seen = installed_world(spec.vocabulary).captions(spec.generate, spec.seed)
    if len(seen) < spec.generate:
        raise ValueError(f"generate: the toy world composed only {len(seen)} distinct captions")
    return seen


def _folder(spec_path: Path, value: str, key: str) -> Path:
    from proxytune.errors import SpecError

    folder = (Path(spec_path).parent / value).expanduser()
    try:
        folder = folder.resolve()
    except (RuntimeError, OSError):
        raise SpecError(f"{spec_path}: {key}: {folder} is a symlink loop") from None
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{spec_path}: {key}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise SpecError(f"{spec_path}: {key}: no such folder {folder}")
    return folder


def captioned_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a raw-data folder, sorted by file name: metadata.jsonl ({"file_name",
    "text"} per line) when present, else NAME.txt beside each image (images without one are skipped).

    Raises:
        ProxytuneError: a malformed metadata.jsonl line, a listed file that is missing, or no pair at all.
    """
    import json

    from proxytune.errors import ProxytuneError
    from proxytune.images import IMAGE_SUFFIXES

    pairs: list[tuple[Path, str]] = []
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file_name"], entry["text"]
            except (ValueError, KeyError, TypeError):
                raise ProxytuneError(f"{metadata}: line {number}: expected {{\"file_name\": ..., \"text\": ...}}") from None
            path = (folder / str(name)).resolve()
            if folder.resolve() not in path.parents or not path.is_file():
                raise ProxytuneError(f"{metadata}: line {number}: no image {name!r} in the folder")
            pairs.append((path, str(text).strip()))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            text = path.with_suffix(".txt")
            if text.is_file():
                pairs.append((path, text.read_text(encoding="utf-8", errors="replace").strip()))
    pairs = sorted((p for p in pairs if p[1]), key=lambda pair: pair[0].name)
    if not pairs:
        raise ProxytuneError(f"{folder}: no captioned images (metadata.jsonl, or NAME.txt beside NAME.png)")
    return pairs


def resolve_style(style: StyleSpec, spec_path: str | Path, index: int) -> tuple[Path, Path | None, list[str]]:
    """(reference folder, raw-data folder or None, curation prompts) of `styles[index]`.

    Raises:
        SpecError: a missing or empty folder, an unreadable image, a missing or empty prompt file, or a
            raw folder without captions; named by key.
    """
    from proxytune.errors import ProxytuneError, SpecError
    from proxytune.images import list_images, open_rgb

    spec_path = Path(spec_path)
    key = f"styles[{index}]"
    if style.toy_style is not None:
        # the world was checked when the spec was read; its references are rendered into the model cache once
        references = installed_world(style.world).style_references(style.toy_style)
    else:
        references = _folder(spec_path, style.images, f"{key}.images")
    try:
        for image in list_images(references):
            open_rgb(image)
    except ProxytuneError as err:
        raise SpecError(f"{spec_path}: {key}.images: {err}") from None
    raw = None
    if style.raw.folder is not None and style.raw.ratio > 0:
        raw = _folder(spec_path, style.raw.folder, f"{key}.raw.folder")
        try:
            captioned_images(raw)
        except ProxytuneError as err:
            raise SpecError(f"{spec_path}: {key}.raw.folder: {err}") from None
    prompts = style.prompts
    if isinstance(prompts, PromptFile):
        path = (spec_path.parent / prompts.file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SpecError(f"{spec_path}: {key}.prompts.file: cannot read {path} "
                            f"({getattr(err, 'strerror', None) or err.__class__.__name__})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise SpecError(f"{spec_path}: {key}.prompts.file: {path} holds no prompts")
        bad = [p for p in prompts if "{" in p or "}" in p]
        if bad:
            raise SpecError(f"{spec_path}: {key}.prompts.file: {bad[0]!r}: no {{...}} fields")
    elif isinstance(prompts, GeneratedPrompts):
        try:
            prompts = generated_prompts(prompts)
        except ValueError as err:
            raise SpecError(f"{spec_path}: {key}.prompts.{err}") from None
    return references, raw, list(prompts)
