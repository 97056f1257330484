"""What a model's own config files say that its loader cannot run: the pre-flight's content checks.

Torch-free and weight-free (`preflight` calls these on config.json / model_index.json / proxytune_student.json
read from a folder or the local Hugging Face cache). Each check raises ModelProblem with a line that starts with
the file it read (`label`) and ends with the fix. The pipeline classes copied from the torch-side
`backends.teachers.diffusion` are checked against it by tests/test_preflight_configs.py.
"""

from __future__ import annotations

from proxytune.backends.lumina_layout import config_problem
from proxytune.backends.student_meta import (JANUS_CONVERT_FIX, JANUS_ORIGINAL_MODEL_TYPE, STUDENT_BACKENDS,
                                             STUDENT_META, STUDENT_MODEL_TYPES)

RUNNABLE_DTYPES = ("float32", "float16", "bfloat16")  # a config's torch_dtype (dtype in transformers 5) proxytune runs
# backends.teachers.diffusion.FAMILIES' pipeline classes (tests check that the two agree; that module imports torch)
TEACHER_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
# backends.encoders loads CLIP with CLIPModel and DINO with ViTModel: the config.json model_type each reads
ENCODER_MODEL_TYPES = {"clip": ("clip", "CLIPModel", "openai/clip-vit-base-patch32"),
                       "dino": ("vit", "ViTModel", "facebook/dino-vits16")}


class ModelProblem(Exception):
    """What is wrong with one model reference (the caller adds the spec file and key)."""


def check_dtype(config: dict, label: str) -> None:
    """A declared torch_dtype (transformers 5 writes `dtype`), top level or in a sub-config, that proxytune runs."""
    subconfigs = ((f"{k}.", v) for k, v in sorted(config.items()) if k.endswith("config") and isinstance(v, dict))
    for where, part in (("", config), *subconfigs):
        for key in ("torch_dtype", "dtype"):
            value = part.get(key)
            if value is not None and value not in RUNNABLE_DTYPES:
                raise ModelProblem(f"{label}: {where}{key} {value!r} is not a dtype proxytune runs "
                                   f"({', '.join(RUNNABLE_DTYPES)}): save the model in one of them")


def check_encoder_config(config: dict, label: str, role: str) -> None:
    """A CLIP / DINO config.json of the model type its loader reads, in a dtype proxytune runs.

    transformers loads another model type's checkpoint into CLIPModel / ViTModel with only a warning and
    random weights where the names differ (a DINOv2 as ViTModel), so the scores would be noise.
    """
    model_type = config.get("model_type")
    wanted, cls, example = ENCODER_MODEL_TYPES[role]
    if model_type is not None and model_type != wanted:
        raise ModelProblem(f"{label}: model_type {model_type!r}: proxytune loads the {role} encoder as {cls} "
                           f"(model_type {wanted!r}), e.g. {example}")
    check_dtype(config, label)


def check_pipeline_index(index: dict, label: str) -> None:
    """A model_index.json whose pipeline class has a proxytune teacher family."""
    name = index.get("_class_name")
    if name not in TEACHER_PIPELINES:
        raise ModelProblem(f"{label}: pipeline class {name!r} has no proxytune teacher family (supported: "
                           f"{', '.join(TEACHER_PIPELINES)}): name an SD 1.5, SDXL, SD3 or FLUX pipeline")


def student_backend(meta: dict | None, config: dict | None, model: str, meta_label: str, config_label: str) -> str | None:
    """The backend a student's proxytune_student.json / config.json name, as `students.detect_backend` reads them;
    None when there is neither. Raises ModelProblem for a layout proxytune cannot load."""
    backend = (meta or {}).get("backend")
    if backend is not None and backend not in STUDENT_BACKENDS:
        raise ModelProblem(f"{meta_label}: unknown backend {backend!r} (known: {', '.join(STUDENT_BACKENDS)})")
    model_type = (config or {}).get("model_type")
    if model_type == JANUS_ORIGINAL_MODEL_TYPE:  # whatever a proxytune_student.json beside it says
        raise ModelProblem(f"{config_label}: {JANUS_CONVERT_FIX.format(src=model)}")
    if config is not None:
        check_dtype(config, config_label)
    if backend is None and config is not None:
        backend = STUDENT_MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if backend is None:
            raise ModelProblem(f"{config_label}: model_type {model_type!r} is not an AR student proxytune trains "
                               f"(janus, chameleon), and there is no {STUDENT_META} naming a backend")
        if backend == "lumina-mgpt":
            check_chameleon_config(config, config_label, (meta or {}).get("image_size"))
            if meta is None:
                raise ModelProblem(f"{config_label}: a Lumina-mGPT (Chameleon) checkpoint as released, without the VQ "
                                   f"decoder proxytune needs: convert it once with `proxytune convert lumina-mgpt {model} "
                                   "OUT --vqgan vqgan.ckpt --image-size N` and name OUT as student.model")
    if backend is None and meta is not None:
        backend = "llamagen"
    return backend


def check_chameleon_config(config: dict, label: str, image_size=None) -> None:
    """The fields of a Lumina-mGPT / Chameleon config.json that `backends.lumina` needs (`lumina_layout`)."""
    problem = config_problem(config, image_size)
    if problem:
        raise ModelProblem(f"{label}: {problem}")
