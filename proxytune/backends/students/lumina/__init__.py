"""Lumina-mGPT (Liu et al. 2024) on transformers' Chameleon (config.json model_type "chameleon").

transformers has no Chameleon VQ decoder, so a student folder is proxytune_student.json naming the
Chameleon weights (here, a folder or a hub id) and a converted VQGAN folder (`vq_decoder`), which
`proxytune convert lumina-mgpt` writes. Modules: layout (token names, config checks; torch-free), weights
(the release's q/k norms), backend (the StudentBackend), convert, tiny (tiny-lumina-mgpt), command (the CLI).
"""

from __future__ import annotations

from pathlib import Path

from proxytune.backends.students import SamplerDefaults, StudentFamily, TinyStudent, lazy, lazy_attribute

# Lumina-mGPT inference_solver.create_logits_processor(cfg=3.0, image_top_k=2000), temperature 1.0
# (its README example passes cfg=4.0; the solver's and the demo's defaults are 3.0)
SAMPLING = SamplerDefaults(cfg_scale=3.0, top_k=2000, temperature=1.0, source="Lumina-mGPT inference_solver.py")
NEEDS_META = ("a Lumina-mGPT (Chameleon) checkpoint as released, without the VQ decoder proxytune needs: convert it "
              "once with `proxytune convert lumina-mgpt {src} OUT --vqgan vqgan.ckpt --image-size N` and name OUT "
              "as student.model")


def check_config(config: dict, meta) -> str | None:
    """What `backend.load` cannot load in a Chameleon config.json (`layout.config_problem`), or None."""
    from proxytune.backends.students.lumina.layout import config_problem

    return config_problem(config, meta.image_size if meta is not None else None)


def check_folder(folder: Path, meta, config, checks) -> None:
    """The vq_decoder folder proxytune_student.json names, the Chameleon weights and tokenizer (here, a
    folder or a hub id) and, when readable without a download, their config.json."""
    decoder = meta.vq_decoder
    if not isinstance(decoder, str) or not decoder:
        raise checks.problem(f"{folder / 'proxytune_student.json'}: must name its vq_decoder folder (transformers "
                             "has no Chameleon VQ decoder; `proxytune convert lumina-mgpt` writes one)")
    checks.weights(folder / decoder, "student vq_decoder")
    for name, kind in (("model", "weights"), ("tokenizer", "tokenizer")):
        checks.part(folder, {name: meta.get(name, meta.get("model", "."))}, name, kind)
    source = meta.get("model", ".")
    if (folder / source).is_dir():
        label = str(folder / source / "config.json")
        weights_config = checks.read_json(folder / source / "config.json")
    else:
        weights_config, label = checks.cached_json(source, "config.json")
    if weights_config is not None:
        checks.config(weights_config, label, meta)


FAMILY = StudentFamily(
    name="lumina-mgpt", label="Lumina-mGPT", load=lazy(f"{__name__}.backend:load"), sampling=SAMPLING,
    model_types=("chameleon",), convert=lazy_attribute(f"{__name__}.command:convert_lumina"),
    tiny={"tiny-lumina-mgpt": TinyStudent("tiny-lumina-mgpt-v3", lazy(f"{__name__}.tiny:build"))},
    check_folder=check_folder, check_config=check_config, needs_meta=NEEDS_META,
    decoder_layers=("ChameleonDecoderLayer", "ChameleonSwinDecoderLayer"),
)
