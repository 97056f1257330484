"""The Lumina-mGPT student backend (tiny Chameleon): image logits unmasked, Lumina's row-end layout,
a VQ decoder sharing the codebook, training by behaviour, adapter round trip, KV cache."""

import pytest
import torch
import torch.nn.functional as F

from proxytune.backends import lumina, students
from proxytune.backends.student_api import StudentBackend


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    import os

    old = os.environ.get("PROXYTUNE_HOME")
    os.environ["PROXYTUNE_HOME"] = str(tmp_path_factory.mktemp("lumina-home"))
    yield
    if old is None:
        os.environ.pop("PROXYTUNE_HOME")
    else:
        os.environ["PROXYTUNE_HOME"] = old


def fresh(home):
    return students.load_student("tiny-lumina-mgpt")


def test_tiny_lumina_is_a_student_backend(home, dreambench):
    from PIL import Image

    bundle = fresh(home)
    assert isinstance(bundle, StudentBackend) and bundle.backend == "lumina-mgpt" and bundle.random_init
    assert bundle.seq_len == 64 and bundle.codebook_size == 256 and bundle.image_size == 64
    image = Image.open(sorted((dreambench / "dog").iterdir())[0])
    codes = bundle.encode_images(bundle.images_to_pixels([image]))
    assert codes.shape == (1, 64)
    assert bundle.decode_codes(codes)[0].size == (64, 64)
    # the decoder shares the Chameleon quantizer's codebook
    assert torch.equal(bundle.decoder.quantize.embedding.weight, bundle._chameleon.vqmodel.quantize.embedding.weight)


def test_layout_has_a_row_end_after_every_row_and_names_image_tokens_as_chameleon(home):
    bundle = fresh(home)
    assert lumina.image_token_name(0) == "IMGIMGAZ" and lumina.image_token_name(409) == "IMGIMGEAJZ"
    mapping = bundle._chameleon.vocabulary_mapping  # transformers' own decoding of the names
    assert [mapping.bpe2img[int(i)] for i in bundle.image_bpe[:12]] == list(range(12))
    codes = torch.arange(64).view(1, 64)
    body = bundle._body(codes)[0]
    assert body.shape == (72,) and all(body[j] == bundle.row_end for j in range(8, 72, 9))
    assert [mapping.bpe2img[int(t)] for j, t in enumerate(body) if j % 9 != 8] == list(range(64))


def test_image_logits_are_unmasked_where_transformers_masks_them(home):
    bundle = fresh(home)
    cond = bundle.encode_prompts(["a S* dog"])
    codes = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bundle.image_logits(cond, codes, torch.zeros(1, dtype=torch.bool))
        prefix, mask = bundle._prefix(cond, torch.zeros(1, dtype=torch.bool))
        theirs = bundle.model(input_ids=prefix, attention_mask=mask).logits[0, -1]
    assert torch.all(theirs[bundle.image_bpe] == torch.finfo(theirs.dtype).min)  # what a plain forward gives
    assert ours.shape == (1, 64, 256) and torch.isfinite(ours).all() and ours.std() > 0.1
    # position 0 of ours is the same state: the lm_head rows of the image tokens, unmasked
    direct = bundle._chameleon(input_ids=prefix, attention_mask=mask).last_hidden_state[0, -1] @ \
        bundle.model.lm_head.weight[bundle.image_bpe].T
    torch.testing.assert_close(ours[0, 0], direct, atol=1e-5, rtol=1e-5)


def _lora(bundle, rank=16):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=rank, lora_alpha=rank, target_modules=bundle.lora_target_modules()))
    return [p for p in bundle.model.parameters() if p.requires_grad]


def test_lora_lands_on_the_decoder_layers_only(home):
    bundle = fresh(home)
    _lora(bundle)
    adapted = [n for n, _ in bundle.model.named_parameters() if "lora_A" in n]
    assert adapted and all(".layers." in n and "vqmodel" not in n for n in adapted)


def test_overfit_one_image_reproduces_its_codes_greedily_and_the_adapter_reloads(home, tmp_path):
    bundle = fresh(home)
    torch.manual_seed(1)
    target = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len))
    cond = bundle.encode_prompts(["a S* dog"])
    opt = torch.optim.AdamW(_lora(bundle), lr=2e-2)
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
    assert losses[-1] < 0.3 * losses[0]
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


def test_the_student_stage_trains_lumina(project, home):
    from conftest import make_params, tiny_spec
    from proxytune.stages.student import StudentRecipe
    from test_student import fake_proxy_set

    params = make_params(project, tiny_spec(student={"model": "tiny-lumina-mgpt", "steps": 6, "batch_size": 2,
                                                     "learning_rate": 1e-2, "lora": {"rank": 4, "alpha": 4, "layers": [0]}}))
    fake_proxy_set(params, 3)
    recipe = StudentRecipe(params)
    recipe.setup()
    adapted = {n.split(".lora_A")[0] for n, _ in recipe.bundle.model.named_parameters() if "lora_A" in n}
    assert adapted and all(".layers.0." in n for n in adapted)
    recipe.train()
    assert recipe.progress.losses[-1] < recipe.progress.losses[0]
