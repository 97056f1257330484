"""The Janus-Pro student backend (tiny JanusForConditionalGeneration): the original's cosine
quantizer, LoRA on the language model only, training by behaviour, adapter round trip, KV cache."""

import pytest
import torch
import torch.nn.functional as F

from proxytune.backends import janus, students
from proxytune.backends.student_api import StudentBackend


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    import os

    old = os.environ.get("PROXYTUNE_HOME")
    os.environ["PROXYTUNE_HOME"] = str(tmp_path_factory.mktemp("janus-home"))
    yield
    if old is None:
        os.environ.pop("PROXYTUNE_HOME")
    else:
        os.environ["PROXYTUNE_HOME"] = old


def fresh(home):
    return students.load_student("tiny-janus")


def test_tiny_janus_is_a_student_backend(home, dreambench):
    from PIL import Image

    bundle = fresh(home)
    assert isinstance(bundle, StudentBackend) and bundle.backend == "janus" and bundle.random_init
    assert bundle.seq_len == 64 and bundle.codebook_size == 256 and bundle.image_size == 64
    image = Image.open(sorted((dreambench / "dog").iterdir())[0])
    codes = bundle.encode_images(bundle.images_to_pixels([image]))
    assert codes.shape == (1, 64) and codes.dtype == torch.long
    assert bundle.decode_codes(codes)[0].size == (64, 64)
    cond = bundle.encode_prompts(["a S* dog", "a much longer prompt about a S* dog on a beach"])
    assert cond.shape == (2, 2, janus.TINY_PROMPT_LEN) and cond[0, 1].sum() < cond[1, 1].sum()  # left padding


def test_quantizer_is_cosine_as_the_original_not_transformers_euclidean(home):
    bundle = fresh(home)
    vq = bundle._janus.vqmodel
    with torch.no_grad():  # codebook rows of very different norms: Euclidean and cosine nearest disagree
        vq.quantize.embedding.weight.mul_(torch.linspace(0.05, 20, vq.config.num_embeddings)[:, None])
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ours = bundle.encode_images(pixels)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(pixels))
        _, _, euclidean = vq.quantize(z)
        flat = z.permute(0, 2, 3, 1).reshape(2, 64, -1)
        expected = (F.normalize(flat, dim=-1) @ F.normalize(vq.quantize.embedding.weight, dim=-1).T).argmax(-1)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours.flatten(), euclidean.flatten())


def test_uncond_prompt_pads_the_content_but_keeps_the_ends(home):
    bundle = fresh(home)
    cond = bundle.encode_prompts(["a S* dog"])
    ids, mask = cond[:, 0], cond[:, 1]
    uncond = bundle._uncond(ids, mask)
    real = mask[0].nonzero().flatten()
    pad = bundle.tokenizer.pad_token_id
    assert uncond[0, real[0]] == ids[0, real[0]] and uncond[0, -1] == ids[0, -1]  # first token, image start
    assert torch.all(uncond[0, real[1:-1]] == pad) and torch.equal(uncond[0, : real[0]], ids[0, : real[0]])


def _lora(bundle, rank=16):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=rank, lora_alpha=rank, target_modules=bundle.lora_target_modules()))
    return [p for p in bundle.model.parameters() if p.requires_grad]


def test_lora_lands_on_the_language_model_only(home):
    bundle = fresh(home)
    _lora(bundle)
    adapted = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert not any("vision" in n or "vqmodel" in n for n in adapted)
    assert len({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted}) == 7  # q k v o gate up down


def test_overfit_one_image_reproduces_its_codes_greedily_and_the_adapter_reloads(home, tmp_path):
    bundle = fresh(home)
    torch.manual_seed(1)
    target = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len))
    cond = bundle.encode_prompts(["a S* dog"])
    params = _lora(bundle)
    opt = torch.optim.AdamW(params, lr=2e-2)
    keep = torch.zeros(1, dtype=torch.bool)
    losses = []
    bundle.model.train()
    for _ in range(80):
        loss = F.cross_entropy(bundle.image_logits(cond, target, keep)[0], target[0])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    bundle.model.eval()
    assert losses[-1] < 0.3 * losses[0]  # the frozen head bounds the logits: argmax, not loss, reaches the codes
    greedy = bundle.generate(["a S* dog"], [0], cfg_scale=1.0, temperature=0)
    assert torch.equal(greedy, target)
    assert torch.equal(bundle.generate(["a S* dog"], [0], cfg_scale=1.0, temperature=0, use_cache=False), greedy)

    bundle.model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    again = fresh(home)
    again.model = PeftModel.from_pretrained(again.model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(again.image_logits(cond, target, keep), bundle.image_logits(cond, target, keep))


def test_sampling_depends_only_on_each_images_prompt_and_seed(home):
    bundle = fresh(home)
    alone = bundle.generate(["a S* dog"], [5], cfg_scale=3.0, top_k=20)
    batch = bundle.generate(["a red ball", "a S* dog"], [9, 5], cfg_scale=3.0, top_k=20)
    assert torch.equal(batch[1:], alone)


def test_the_student_stage_trains_janus_with_selected_layers(project, home):
    from conftest import make_params, tiny_spec
    from proxytune.stages.student import StudentRecipe
    from test_student import fake_proxy_set

    params = make_params(project, tiny_spec(student={"model": "tiny-janus", "steps": 6, "batch_size": 2,
                                                     "learning_rate": 1e-2, "lora": {"rank": 4, "alpha": 4, "layers": [1]}}))
    fake_proxy_set(params, 3)
    recipe = StudentRecipe(params)
    recipe.setup()
    adapted = {n.split(".lora_A")[0] for n, _ in recipe.bundle.model.named_parameters() if "lora_A" in n}
    assert adapted and all(".language_model.layers.1." in n for n in adapted)
    assert recipe.codes.shape == (3, 64)
    recipe.train()
    assert recipe.progress.losses[-1] < recipe.progress.losses[0]
