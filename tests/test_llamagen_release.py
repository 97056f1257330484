"""LlamaGen's T2I release as a user downloads it (peizesun/llamagen_t2i .pt files + google/flan-t5-xl),
tiny but laid out as released (`releases.llamagen`): `proxytune convert llamagen` turns each GPT file
into a student folder whose logits are the original formulation's (computed independently in
test_llamagen_port), the codes and student stages train it through their own code in float32 (the
release's dtype) and under bf16 autocast, it samples and decodes, it runs with its weights in bf16
(LlamaGen's sampler default), and every bad file is one line naming the file and the key."""

import argparse
import re

import pytest
import torch
from click.testing import CliRunner

from proxytune.backends import students
from proxytune.cli import main
from proxytune.errors import ProxytuneError
from releases import llamagen as release

STAGES = {"stage1": "t2i_XL_stage1_256.pt", "stage2": "t2i_XL_stage2_512.pt"}
TINY_ARGS = {"stage1": release.TINY_GPT_STAGE1, "stage2": release.TINY_GPT_STAGE2}
PROMPTS = ["a photo of a S* dog", "a red backpack on the beach"]


def load_weights_only(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def convert(paths, stage: str, out, *options: str) -> CliRunner:
    """`proxytune convert llamagen` as a user runs it (the image size: the checkpoint's own, unless given)."""
    return CliRunner().invoke(main, ["convert", "llamagen", str(paths[STAGES[stage]]), str(out),
                                     "--vq", str(paths["vq_ds16_t2i.pt"]), "--text-encoder", str(paths["flan-t5-xl"]),
                                     "--heads", "4", *options])


@pytest.fixture(scope="session")
def llamagen_release(tmp_path_factory):
    """The tiny release files and, converted from them by the CLI, one student folder per GPT file."""
    root = tmp_path_factory.mktemp("llamagen_release")
    paths = release.build_release(root / "downloads")
    for stage in STAGES:
        result = convert(paths, stage, root / f"student-{stage}")
        assert result.exit_code == 0, result.output
        paths[stage] = root / f"student-{stage}"
    return paths


def test_the_fixture_is_laid_out_as_released(llamagen_release):
    """What train_t2i.py / vq_train.py save and what a T5ForConditionalGeneration hub folder holds."""
    paths = llamagen_release
    for name, args in zip(STAGES.values(), TINY_ARGS.values()):
        ckpt = load_weights_only(paths[name])
        assert set(ckpt) == {"model", "optimizer", "steps", "args"} and ckpt["args"].gpt_model == "GPT-XL"
        assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == release.gpt_shapes(args)
        assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
    vq = load_weights_only(paths["vq_ds16_t2i.pt"])
    assert set(vq) == {"model", "optimizer", "discriminator", "optimizer_disc", "steps", "args"}
    assert vq["model"]["quantize.codebook_used"].shape == (65536,)
    t5 = paths["flan-t5-xl"]
    assert {p.name for p in t5.iterdir()} >= {"config.json", "model.safetensors.index.json", "spiece.model",
                                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert len(list(t5.glob("model-0000*-of-0000*.safetensors"))) >= 2


@pytest.mark.parametrize("stage", STAGES)
def test_each_gpt_file_converts_to_a_student_with_the_originals_logits(llamagen_release, stage):
    """Caption features from the release's T5 folder, left-padded into the 120 slots; the converted
    student's logits equal the original formulation's on the file's own weights (both CFG branches),
    on a 4 x 4 (stage 1) and an 8 x 8 (stage 2) code grid."""
    from test_llamagen_port import TOL, original_logits

    bundle = students.load_student(str(llamagen_release[stage]))
    args = TINY_ARGS[stage]
    assert bundle.image_size == release.TINY_IMAGE_SIZE[STAGES[stage]]  # read from the file's training args
    assert bundle.seq_len == args["block_size"] and bundle.config.cond_len == args["cls_token_num"] == 120
    assert {bundle.model.dtype, bundle.vq.dtype, bundle.text_encoder.dtype} == {torch.float32}  # as released
    original = load_weights_only(llamagen_release[STAGES[stage]])["model"]
    cond = bundle.encode_prompts(PROMPTS)
    lengths = (cond != 0).any(-1).sum(-1)
    assert lengths.tolist() == [len(bundle.tokenizer(p).input_ids) for p in bundle_prompts(bundle)]
    codes = torch.randint(0, args["vocab_size"], (2, bundle.seq_len), generator=torch.Generator().manual_seed(0))
    for drop in (torch.tensor([False, False]), torch.tensor([True, True])):
        with torch.no_grad():
            expected = original_logits(original, bundle.config, cond, lengths, codes, drop)
            got = bundle.image_logits(cond, codes, drop)
        assert (got - expected).abs().max().item() < TOL


def bundle_prompts(bundle):
    from proxytune.backends.captions import clean_caption

    return [clean_caption(p) for p in PROMPTS] if bundle.config.clean_captions else PROMPTS


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_stages_train_the_converted_release_and_it_samples(project, llamagen_release, mixed_precision):
    """codes stage -> LoRA steps -> samples.png's sampling and decoding, through the stages' own code."""
    from conftest import make_params, tiny_spec
    from proxytune.stages.student import StudentTrainer
    from test_student import fake_proxy_set

    folder = str(llamagen_release["stage1"])
    params = make_params(project, tiny_spec(student={
        "model": folder, "steps": 6, "batch_size": 2, "learning_rate": 1e-2, "mixed_precision": mixed_precision,
        "lora": {"rank": 4, "alpha": 4}, "sampling": {"cfg_scale": 2.0, "top_k": 50}}))
    fake_proxy_set(params, 2)  # runs the codes stage's encoding
    recipe = StudentTrainer(params)
    recipe.setup()
    assert recipe.codes.shape == (2, 16) and recipe.conds.shape[1:] == (120, 32)
    before = {n: p.detach().clone() for n, p in recipe.bundle.model.named_parameters() if p.requires_grad}
    seen = set()  # the dtype the head computes in: autocast's under bf16, the release's float32 otherwise
    head = recipe.bundle.model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    recipe.train()
    hook.remove()
    assert seen == {torch.bfloat16 if mixed_precision == "bf16" else torch.float32}
    losses = recipe.progress.losses
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    after = dict(recipe.bundle.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    image = recipe.sample_grid(count=2)  # sampling with CFG and the VQ decoder, as the stage saves it
    assert image.size[0] > 0 and len(set(image.getdata())) > 1


def test_the_release_runs_in_bf16_as_the_original_sampler_loads_it(llamagen_release):
    """sample_t2i.py --precision bf16 (its default) puts the GPT and T5 in bf16: every step still runs,
    and the logits stay close to float32's."""
    bundle = students.load_student(str(llamagen_release["stage1"]))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = bundle.encode_images(pixels)
    cond = bundle.encode_prompts(PROMPTS)
    keep = torch.tensor([False, False])
    with torch.no_grad():
        reference = bundle.image_logits(cond, codes, keep)
    for part in (bundle.model, bundle.text_encoder):
        part.to(torch.bfloat16)
    half_cond = bundle.encode_prompts(PROMPTS)
    assert half_cond.dtype == torch.bfloat16
    with torch.no_grad():
        half = bundle.image_logits(half_cond, codes, keep).float()
    assert (half - reference).abs().max() < 0.1 * reference.std()
    loss = bundle.loss(half_cond, codes, cfg_dropout=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    sampled = bundle.generate(PROMPTS[:1], [0], cfg_scale=4.0, top_k=10)
    assert sampled.shape == (1, 16) and bundle.decode_codes(sampled)[0].size == (64, 64)


def test_bad_release_files_are_one_line_naming_file_and_key(llamagen_release, tmp_path):
    paths = llamagen_release
    original = load_weights_only(paths[STAGES["stage1"]])
    cases = {
        "list.pt": ({**original, "model": {**original["model"], "norm.weight": [1.0, 2.0]}}, r"key 'norm\.weight' holds a list"),
        "ints.pt": ({**original, "model": {**original["model"], "output.weight": original["model"]["output.weight"].long()}},
                    r"output\.weight is torch\.int64, not floating-point"),
        "no_model.pt": ({"optimizer": original["optimizer"], "steps": 3}, r"key 'optimizer' holds a dict"),
    }
    for name, (ckpt, message) in cases.items():
        torch.save(ckpt, tmp_path / name)
        result = CliRunner().invoke(main, ["convert", "llamagen", str(tmp_path / name), str(tmp_path / f"out-{name}"),
                                           "--vq", str(paths["vq_ds16_t2i.pt"]), "--heads", "4", "--image-size", "64"])
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], (name, result.output)
        assert re.search(message, lines[0]), (name, lines[0])
    # a size other than the one the file was trained at converts, with a note saying so
    result = convert(paths, "stage2", tmp_path / "at64", "--image-size", "64")
    assert result.exit_code == 0 and "was trained at 128 px; converting for 64 px" in result.output
    # a VQ file whose tensors disagree with each other (quant_conv for a 4-wide codebook): one line, the file named
    vq = load_weights_only(paths["vq_ds16_t2i.pt"])
    vq["model"]["quant_conv.weight"] = torch.zeros(4, 32, 1, 1)
    torch.save(vq, tmp_path / "vq_bad.pt")
    result = CliRunner().invoke(main, ["convert", "vqgan", str(tmp_path / "vq_bad.pt"), str(tmp_path / "vq_out"),
                                       "--layout", "llamagen"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "vq_bad.pt" in result.output
    # a student folder whose transformer config was damaged: one ProxytuneError line, no traceback
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(paths["stage1"], broken)
    (broken / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ProxytuneError, match="cannot load transformer/") as err:
        students.load_student(str(broken))
    assert len(str(err.value).splitlines()) == 1
    (broken / "proxytune_student.json").write_text("{not json")
    with pytest.raises(ProxytuneError, match=r"proxytune_student\.json: cannot read it"):
        students.load_student(str(broken))


def test_preflight_passes_the_converted_folders_and_names_what_is_wrong(llamagen_release, tmp_path):
    """The existing pre-flight (proxytune/preflight.py) on what a user has before `apply` runs."""
    import json
    import shutil

    from proxytune.preflight import ModelProblem, check_model

    for stage in STAGES:
        check_model(str(llamagen_release[stage]), "student", tmp_path)
    with pytest.raises(ModelProblem, match="a file, not a model folder .*proxytune convert llamagen"):  # the raw download
        check_model(str(llamagen_release[STAGES["stage1"]]), "student", tmp_path)
    moved = tmp_path / "moved"  # the T5 folder recorded by absolute path has since gone
    shutil.copytree(llamagen_release["stage1"], moved)
    meta = json.loads((moved / "proxytune_student.json").read_text())
    meta["text_encoder"] = meta["tokenizer"] = str(tmp_path / "gone" / "flan-t5-xl")
    (moved / "proxytune_student.json").write_text(json.dumps(meta))
    with pytest.raises(ModelProblem, match="text_encoder"):
        check_model(str(moved), "student", tmp_path)
