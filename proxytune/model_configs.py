"""What a model's own config files say that its loader cannot run: the pre-flight's content checks.

Torch-free and weight-free (`preflight` calls these on config.json / model_index.json / proxytune_student.json
read from a folder or the local Hugging Face cache). Each check raises ModelProblem with a line that starts with
the file it read (`label`) and ends with the fix. The pipeline classes copied from the torch-side
`backends.teachers.diffusion` are checked against it by tests/test_preflight_configs.py.
"""

from __future__ import annotations

from proxytune.backends.students.meta import StudentMeta

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


def student_backend(meta: StudentMeta | None, config: dict | None, model: str, meta_label: str,
                    config_label: str) -> str | None:
    """The student family a proxytune_student.json / config.json name (`students.detect_files`, the one
    detection the loader uses too), with what its record says a config.json must hold; None when there is
    neither file. Raises ModelProblem for a layout proxytune cannot load."""
    from proxytune.backends import students

    try:
        name = students.detect_files(meta, config, model)
    except students.Unrecognised as err:
        model_type = config.get("model_type") if config is not None else None
        if err.file == "config" and not (isinstance(model_type, str) and model_type in refused_model_types()):
            check_dtype(config, config_label)  # a dtype problem is named before an unknown model type, as always
        raise ModelProblem(f"{meta_label if err.file == 'meta' else config_label}: {err}") from None
    if config is not None:
        check_dtype(config, config_label)
    if name is not None and config is not None and (meta is None or meta.backend is None):
        record = students.family(name)
        check_family_config(record, config, config_label, meta)
        if meta is None and record.needs_meta:
            raise ModelProblem(f"{config_label}: {record.needs_meta.format(src=model)}")
    return name


def refused_model_types() -> set[str]:
    from proxytune.backends import students

    return {model_type for record in students.families().values() for model_type in record.refused}


def check_family_config(record, config: dict, label: str, meta: StudentMeta | None) -> None:
    """What a student family's record says its config.json must hold for its loader (Lumina-mGPT's Chameleon
    fields, `students.lumina.layout`); nothing for a family without such a check."""
    problem = record.check_config(config, meta) if record.check_config is not None else None
    if problem:
        raise ModelProblem(f"{label}: {problem}")
