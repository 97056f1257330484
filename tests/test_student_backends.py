"""The tests every AR student backend passes (llamagen has its own, more detailed, in
test_ar_backend.py): a tiny student overfit on one image reproduces its codes exactly under greedy
decoding, with and without the KV cache; a saved adapter reloads with `PeftModel.from_pretrained` to
identical logits; sampling depends only on each image's prompt and seed; the student stage trains it,
with LoRA on the chosen decoder layers only."""

import pytest
import torch
import torch.nn.functional as F

from proxytune.backends import students
from proxytune.backends.students.api import StudentBackend
from conftest import add_lora

BACKENDS = {"tiny-janus": "janus", "tiny-lumina-mgpt": "lumina-mgpt"}
SIZES = {"tiny-janus": 64, "tiny-lumina-mgpt": 128}  # Lumina-mGPT's: an x16 VQ, as Chameleon's


@pytest.mark.parametrize("name", list(BACKENDS))
def test_tiny_variant_is_a_student_backend_that_round_trips_images(name, photos):
    from PIL import Image

    bundle = students.load_student(name)
    assert isinstance(bundle, StudentBackend) and bundle.backend == BACKENDS[name] and bundle.random_init
    size = SIZES[name]
    assert bundle.seq_len == 64 and bundle.codebook_size == 256 and bundle.image_size == size
    image = Image.open(sorted((photos / "dog").iterdir())[0])
    codes = bundle.encode_images(bundle.images_to_pixels([image]))
    assert codes.shape == (1, 64) and codes.dtype == torch.long
    assert bundle.decode_codes(codes)[0].size == (size, size)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_overfit_one_image_reproduces_its_codes_greedily_and_the_adapter_reloads(tmp_path, name):
    bundle = students.load_student(name)
    assert isinstance(bundle, StudentBackend) and bundle.backend == BACKENDS[name]
    torch.manual_seed(1)
    target = torch.randint(0, bundle.codebook_size, (1, bundle.seq_len))
    cond = bundle.encode_prompts(["a S* dog"])
    opt = torch.optim.AdamW(add_lora(bundle), lr=2e-2)
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

    again = students.load_student(name)
    again.model = PeftModel.from_pretrained(again.model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(again.image_logits(cond, target, keep), bundle.image_logits(cond, target, keep))


@pytest.mark.parametrize("name", list(BACKENDS))
def test_sampling_depends_only_on_each_images_prompt_and_seed(name):
    bundle = students.load_student(name)
    alone = bundle.generate(["a S* dog"], [5], cfg_scale=3.0, top_k=20)
    batch = bundle.generate(["a red ball", "a S* dog"], [9, 5], cfg_scale=3.0, top_k=20)
    assert torch.equal(batch[1:], alone)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_the_student_stage_trains_it_with_selected_layers(project, name):
    from conftest import make_params, tiny_spec
    from proxytune.stages.student import StudentTrainer
    from test_student import fake_proxy_set

    params = make_params(project, tiny_spec(student={"model": name, "steps": 6, "batch_size": 2, "learning_rate": 1e-2,
                                                     "lora": {"rank": 4, "alpha": 4, "layers": [1]}}))
    fake_proxy_set(params, 3)
    recipe = StudentTrainer(params)
    recipe.setup()
    adapted = {n.split(".lora_A")[0] for n, _ in recipe.bundle.model.named_parameters() if "lora_A" in n}
    assert adapted and all(".layers.1." in n for n in adapted)
    assert recipe.codes.shape == (3, recipe.bundle.seq_len)
    # the spec's cfg_scale and top_k (tiny_spec sets them) win; temperature is the backend's default
    assert recipe.sampling == {"cfg_scale": 2.0, "top_k": 50, "temperature": 1.0}
    recipe.train()
    losses = recipe.progress.losses  # one batch of 2 of 3 images per step: compare means, not single steps
    assert sum(losses[-3:]) < sum(losses[:3])
    # Lumina-mGPT trains with its original's objective, which has a z-loss term; Janus has none
    assert (min(recipe.progress.series["z_loss"]) > 0) == (name == "tiny-lumina-mgpt")


def test_each_backend_samples_with_its_authors_settings_unless_the_spec_says_otherwise():
    """LlamaGen sample_t2i.py: CFG 7.5, top-k 1000, temperature 1; Lumina-mGPT's inference solver:
    CFG 3, image top-k 2000, temperature 1; Janus generation_inference.py: CFG 5, temperature 1, no top-k."""
    from proxytune.backends.students.api import sampling_settings
    from proxytune.spec.student import SamplingSpec

    assert sampling_settings("llamagen", SamplingSpec()) == {"cfg_scale": 7.5, "top_k": 1000, "temperature": 1.0}
    assert sampling_settings("lumina-mgpt", SamplingSpec()) == {"cfg_scale": 3.0, "top_k": 2000, "temperature": 1.0}
    assert sampling_settings("janus", SamplingSpec()) == {"cfg_scale": 5.0, "top_k": None, "temperature": 1.0}
    given = SamplingSpec(cfg_scale=4.0, top_k=100)
    assert sampling_settings("janus", given) == {"cfg_scale": 4.0, "top_k": 100, "temperature": 1.0}
    assert sampling_settings("lumina-mgpt", SamplingSpec(temperature=0.0))["temperature"] == 0.0  # 0 is a value, not "unset"


def test_evaluation_samples_the_student_with_its_backends_defaults(project):
    """A spec without sampler settings: the evaluation samples Janus-Pro with CFG 5, no top-k, temperature 1."""
    from conftest import make_params, tiny_spec
    from proxytune.outputs import write_record
    from proxytune.stages import evaluate

    params = make_params(project, tiny_spec(student={"model": "tiny-janus", "sampling": {}}))
    bundle = students.load_student("tiny-janus")
    add_lora(bundle, rank=4)
    bundle.model.save_pretrained(params.student_out() / "adapter")
    write_record(params.student_out(), {"weights": "adapter/adapter_model.safetensors"})
    sampler = evaluate.StudentSampler(params)
    assert sampler.sampling == {"cfg_scale": 5.0, "top_k": None, "temperature": 1.0}
    assert sampler(["a sks dog"], [0])[0].size == (64, 64)


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-lumina-mgpt", "tiny-llamagen"])
def test_tokenizers_to_moves_only_what_encoding_uses(name):
    """The codes stage puts only the image tokenizer (and LlamaGen's T5) on the accelerator: the generator
    stays where it was loaded ("meta" stands in for the GPU: every moved weight shows there)."""
    bundle = students.load_student(name)
    bundle.tokenizers_to("meta")
    on_meta = {n for n, p in bundle.model.named_parameters() if p.is_meta}
    generator = [n for n, p in bundle.model.named_parameters() if "vq" not in n.lower()]
    assert generator and not on_meta & set(generator), sorted(on_meta & set(generator))[:3]
    vq = getattr(bundle, "vq", None) or getattr(bundle.model.model, "vqmodel", None)
    assert vq is not None and all(p.is_meta for p in vq.parameters())
