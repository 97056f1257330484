"""Models as `plan` sees them: a component kind and its config, built on the meta device.

`describe_teacher` / `describe_student` turn a spec's model reference into components (name -> kind and
config) from, in order: the built-in release tables (`releases`), a built-in tiny model's folder, a local
folder, or the Hugging Face cache. `build` makes a component's module without allocating weights (call
it under `torch.device("meta")`); `depth_knobs` names the config fields that repeat a block, which the
estimator varies to trace a shallow copy and scale (see `estimate`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from proxytune import builtins
from proxytune.backends.teachers.teacher_sizes import config_file
from proxytune.errors import ProxytuneError
from proxytune.plan import releases

DENOISERS = ("unet", "sd3", "flux")
_PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
_DENOISER_KIND = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
_ENCODER_KIND = {"CLIPTextModel": "clip", "CLIPTextModelWithProjection": "clip-projection", "T5EncoderModel": "t5"}


@dataclass
class Component:
    kind: str
    config: dict


@dataclass
class TeacherModel:
    ref: str
    family: str  # sd, sdxl, sd3, flux
    parts: dict[str, Component]  # denoiser under "unet" or "transformer", text encoders, "vae"
    t5_tokens: int = 0  # prompt length of the T5 (SD3, FLUX)

    @property
    def denoiser(self) -> Component:
        return self.parts.get("unet") or self.parts["transformer"]


@dataclass
class StudentModel:
    ref: str
    backend: str  # llamagen, lumina-mgpt, janus
    image_size: int
    dtype: str  # the dtype its checkpoint declares (transformers 5 loads in it)
    parts: dict[str, Component] = field(default_factory=dict)  # "model", and "text_encoder", "vq" where separate
    prompt_tokens: int = 0


# -- building -----------------------------------------------------------------------------------
def build(component: Component):
    """The component's module, with random (or, under torch.device('meta'), no) weights."""
    kind, cfg = component.kind, copy.deepcopy(component.config)
    if kind in ("unet", "sd3", "flux", "vae", "vq"):
        import diffusers

        cls = {"unet": diffusers.UNet2DConditionModel, "sd3": diffusers.SD3Transformer2DModel,
               "flux": diffusers.FluxTransformer2DModel, "vae": diffusers.AutoencoderKL, "vq": diffusers.VQModel}[kind]
        return cls.from_config(cfg)
    import transformers

    if kind in ("clip", "clip-projection"):
        cls = transformers.CLIPTextModel if kind == "clip" else transformers.CLIPTextModelWithProjection
        return cls(transformers.CLIPTextConfig(**cfg))
    if kind == "t5":
        return transformers.T5EncoderModel(transformers.T5Config(**cfg))
    if kind == "llamagen":
        from proxytune.backends.students.llamagen.model import LlamaGenStudent, LlamaGenStudentConfig

        return LlamaGenStudent(LlamaGenStudentConfig(**cfg))
    if kind == "chameleon":
        # sizes do not depend on the token names; the model only looks up "<image>" when built
        cfg["vocabulary_map"] = {"<image>": 8711}
        return transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(**cfg))
    if kind == "janus":
        return transformers.JanusForConditionalGeneration(transformers.JanusConfig(**cfg))
    if kind == "chameleon-vq":  # the model's own image tokenizer, for the codes stage
        return transformers.ChameleonVQVAE(transformers.ChameleonVQVAEConfig(**cfg.get("vq_config", {})))
    if kind == "janus-vq":
        from transformers.models.janus.modeling_janus import JanusVQVAE

        return JanusVQVAE(transformers.JanusVQVAEConfig(**cfg.get("vq_config", {})))
    raise ProxytuneError(f"plan: no builder for a {kind!r} model")


def depth_knobs(component: Component) -> list[tuple[tuple, int, int]]:
    """(field path, shallow value, full value) for each repeated block kind of a trainable component.

    The shallow copy has every knob at its shallow value; SD3 keeps 2 blocks because its last block is
    a different (context-free) kind.
    """
    kind, cfg = component.kind, component.config
    if kind == "unet":
        depth = cfg.get("transformer_layers_per_block", 1)
        if isinstance(depth, int):
            return [(("transformer_layers_per_block",), 1, depth)] if depth > 1 else []
        return [(("transformer_layers_per_block", i), 1, d) for i, d in enumerate(depth) if d > 1]
    if kind == "sd3":
        return [(("num_layers",), 2, cfg.get("num_layers", 18))]
    if kind == "flux":
        return [(("num_layers",), 1, cfg.get("num_layers", 19)), (("num_single_layers",), 1, cfg.get("num_single_layers", 38))]
    if kind in ("llamagen", "chameleon"):
        return [(("num_hidden_layers",), 1, cfg["num_hidden_layers"])]
    if kind == "janus":
        return [(("text_config", "num_hidden_layers"), 1, cfg["text_config"]["num_hidden_layers"])]
    return []


def with_knobs(component: Component, values: dict[tuple, int]) -> Component:
    """A copy of the component with the given knob values set (list entries by index)."""
    cfg = json.loads(json.dumps(component.config))  # tuples become lists, so entries can be set
    for path, value in values.items():
        target = cfg
        for key in path[:-1]:
            target = target[key]
        last = path[-1]
        if isinstance(last, int):
            target[last] = value
        elif isinstance(last, str) and isinstance(target.get(last), list):
            target[last] = [value] * len(target[last])
        else:
            target[last] = value
    return Component(component.kind, cfg)


def count_parameters(module) -> dict[str, int]:
    """{"frozen", "trainable", "linear", "linear_rows", "nf4_linear", "nf4_blocks", "nf4_groups", "nf4_tensors"}
    for a (meta) module: "linear" is the frozen nn.Linear weights among the frozen (what `teacher.quantize:
    int8 / fp8` stores at 1 byte), "linear_rows" their output rows (one scale each); the nf4 counts are of
    the frozen Linear weights NF4 can hold (whole 64-value blocks), their blocks, the groups of blocks that
    share a scale (`quantize.nf4_scaler_group`) and the weights themselves."""
    import torch

    from proxytune.backends.teachers.quantize import NF4_BLOCK, nf4_scaler_group

    counts = dict.fromkeys(("frozen", "trainable", "linear", "linear_rows", "nf4_linear", "nf4_blocks", "nf4_groups",
                            "nf4_tensors"), 0)
    for param in module.parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad:
            numel = layer.weight.numel()
            counts["linear"] += numel
            counts["linear_rows"] += layer.weight.shape[0]
            group = nf4_scaler_group(numel)
            if group is not None:
                counts["nf4_linear"] += numel
                counts["nf4_blocks"] += numel // NF4_BLOCK
                counts["nf4_groups"] += numel // NF4_BLOCK // group
                counts["nf4_tensors"] += 1
    return counts


# -- reading configs ------------------------------------------------------------------------------
def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}


def _tiny_folder(ref: str, table: dict) -> str | None:
    if ref not in table:
        return None
    return str(table[ref]())


def describe_teacher(ref: str, root: Path) -> TeacherModel:
    """The teacher pipeline `ref` (a release name, built-in tiny name, folder or cached hub id) as components.

    Raises:
        ProxytuneError: its configs are neither built in nor readable locally.
    """
    name = releases.TEACHER_IDS.get(ref, ref)
    if name in releases.TEACHERS:
        family, parts = releases.TEACHERS[name]
        return TeacherModel(ref, family, {k: Component(kind, dict(cfg)) for k, (kind, cfg) in parts.items()},
                            releases.T5_TOKENS.get(family, 0))
    folder = _tiny_folder(ref, builtins.builders("teacher")) or ref
    index = config_file(folder, "model_index.json", root)
    if index is None or index.get("_class_name") not in _PIPELINE_FAMILY:
        raise ProxytuneError(
            f"teacher.model: cannot size {ref!r} without downloading it: not a built-in release "
            f"({', '.join(releases.TEACHER_IDS)}), and no diffusers model_index.json in a local folder or the HF cache")
    parts: dict[str, Component] = {}
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        kind = _DENOISER_KIND.get(spec[1]) or _ENCODER_KIND.get(spec[1]) or ("vae" if spec[1] == "AutoencoderKL" else None)
        if kind is None:
            continue
        config = config_file(folder, f"{part}/config.json", root)
        if config is None:
            raise ProxytuneError(f"teacher.model: {ref!r}: {part}/config.json is missing")
        parts[part] = Component(kind, _clean(config))
    family = _PIPELINE_FAMILY[index["_class_name"]]
    t5_tokens = releases.T5_TOKENS.get(family, 0)
    tokenizer = config_file(folder, ("tokenizer_3" if family == "sd3" else "tokenizer_2") + "/tokenizer_config.json", root)
    if t5_tokens and tokenizer and isinstance(tokenizer.get("model_max_length"), int):
        t5_tokens = min(t5_tokens, tokenizer["model_max_length"])  # as diffusion.max_sequence_length does
    return TeacherModel(ref, family, parts, t5_tokens)


def describe_student(ref: str, root: Path) -> StudentModel:
    """The student `ref` (a release name, built-in tiny name, converted folder or cached hub id) as components.

    Raises:
        ProxytuneError: its configs are neither built in nor readable locally.
    """
    if ref in releases.STUDENTS:
        backend, size, dtype, parts = releases.STUDENTS[ref]
        return StudentModel(ref, backend, size, dtype, {k: Component(kind, dict(cfg)) for k, (kind, cfg) in parts.items()},
                            releases.PROMPT_TOKENS[backend])
    from proxytune import builtins
    from proxytune.backends.students.meta import STUDENT_META, StudentMeta

    folder = _tiny_folder(ref, builtins.builders("student")) or ref
    meta = StudentMeta.parse(config_file(folder, STUDENT_META, root) or {})
    config = config_file(folder, "config.json", root)
    backend = meta.get("backend")
    if backend == "llamagen" or (config is None and meta.to_dict()):
        model = config_file(folder, "transformer/config.json", root)
        text = config_file(folder, "text_encoder/config.json", root)
        vq = config_file(folder, "vqvae/config.json", root)
        if model is None:
            raise ProxytuneError(f"student.model: {ref!r}: transformer/config.json is missing")
        parts = {"model": Component("llamagen", _clean(model))}
        if text is not None:
            parts["text_encoder"] = Component("t5", _clean(text))
        if vq is not None:
            parts["vq"] = Component("vq", _clean(vq))
        return StudentModel(ref, "llamagen", int(meta.get("image_size", 256)), "float32", parts, 0)
    if config is None:
        raise ProxytuneError(
            f"student.model: cannot size {ref!r} without downloading it: not a built-in release "
            f"({', '.join(releases.STUDENTS)}), and no config.json in a local folder or the HF cache")
    model_type = config.get("model_type")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if model_type == "chameleon" or backend == "lumina-mgpt":
        cfg = _clean(config)
        cfg.pop("vocabulary_map", None)  # 1.7 MB of token names; sizes do not depend on it
        size = int(meta.get("image_size", 512))
        return StudentModel(ref, "lumina-mgpt", size, dtype, {"model": Component("chameleon", cfg)},
                            int(meta.get("prompt_len", releases.PROMPT_TOKENS["lumina-mgpt"])))
    if model_type == "janus" or backend == "janus":
        size = int(meta.get("image_size", 384))
        return StudentModel(ref, "janus", size, dtype, {"model": Component("janus", _clean(config))},
                            int(meta.get("prompt_len", releases.PROMPT_TOKENS["janus"])))
    raise ProxytuneError(f"student.model: {ref!r}: model_type {model_type!r} is not a student plan can size")
