"""StyleAR style tokens (issue 15, first piece): the resampler against an independent re-computation of
the original's forward on weights under the original key names, placeholder replacement on the tiny
Lumina-mGPT, the style-enhanced noise, and StyleAR's LoRA layout <-> peft on a tiny Chameleon."""

import math

import pytest
import torch
import torch.nn.functional as F

from proxytune.backends import students
from proxytune.backends.stylear import style_tokens as st
from proxytune.backends.stylear import stylear_convert
from proxytune.errors import ProxytuneError
from releases import stylear as stylear_release

TINY = st.ResamplerConfig(dim=32, depth=2, dim_head=8, heads=3, num_queries=4, embedding_dim=20, output_dim=48,
                          ff_mult=4)


def original_layout_state(c: st.ResamplerConfig, seed: int = 0) -> dict:
    """Random weights under the original Resampler's parameter names (LayerNorms not at identity)."""
    return stylear_release.resampler_state(c, seed)


def reference_resampler(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The original Resampler.forward (apply_pos_emb=False, no mean-pooled latents), op by op, on a
    state dict with the original names: reshape_tensor's view/transpose/reshape, the d^-1/4 scale
    on both q and k, the float softmax, permute + reshape back."""
    def ln(t, w, b):
        return F.layer_norm(t, (t.shape[-1],), sd[w], sd[b])

    def heads_first(t):
        bs, length, width = t.shape
        return t.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)

    latents = sd["latents"].repeat(x.size(0), 1, 1)
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        xn = ln(x, p + "0.norm1.weight", p + "0.norm1.bias")
        ln_lat = ln(latents, p + "0.norm2.weight", p + "0.norm2.bias")
        b, l, _ = ln_lat.shape
        q = F.linear(ln_lat, sd[p + "0.to_q.weight"])
        k, v = F.linear(torch.cat((xn, ln_lat), dim=-2), sd[p + "0.to_kv.weight"]).chunk(2, dim=-1)
        q, k, v = heads_first(q), heads_first(k), heads_first(v)
        dim_head = q.shape[-1]
        scale = 1 / math.sqrt(math.sqrt(dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, l, -1)
        latents = F.linear(out, sd[p + "0.to_out.weight"]) + latents
        h = ln(latents, p + "1.0.weight", p + "1.0.bias")
        h = F.linear(F.gelu(F.linear(h, sd[p + "1.1.weight"])), sd[p + "1.3.weight"])
        latents = h + latents
    latents = F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"])
    return ln(latents, "norm_out.weight", "norm_out.bias")


# -- resampler ------------------------------------------------------------------------------------

def test_resampler_matches_the_original_forward_on_original_weights():
    sd = original_layout_state(TINY)
    module = stylear_convert.resampler_from_original(sd, dim_head=TINY.dim_head)
    assert module.config == TINY  # every size read back from the tensors
    x = torch.randn(3, 7, TINY.embedding_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module(x), reference_resampler(sd, x, heads=TINY.heads)
    assert ours.shape == (3, TINY.num_queries, TINY.output_dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the batch rows are independent and the output is not trivially the queries
    torch.testing.assert_close(module(x[1:2]), ours[1:2], rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-2


def test_stylear_resampler_has_the_released_shapes():
    with torch.device("meta"):
        module = st.StyleResampler(st.STYLEAR_RESAMPLER)
    shapes = {k: tuple(v.shape) for k, v in stylear_convert.resampler_to_original(module).items()}
    assert shapes["latents"] == (1, 16, 4096) and shapes["proj_in.weight"] == (4096, 1280)
    assert shapes["layers.3.0.to_q.weight"] == (768, 4096) and shapes["layers.3.0.to_kv.weight"] == (1536, 4096)
    assert shapes["layers.3.1.1.weight"] == (16384, 4096) and shapes["proj_out.weight"] == (4096, 4096)
    assert "layers.4.0.to_q.weight" not in shapes


def test_resampler_weights_round_trip_and_bad_state_dicts_are_refused(tmp_path):
    sd = original_layout_state(TINY)
    module = stylear_convert.resampler_from_original(sd, dim_head=TINY.dim_head)
    back = stylear_convert.resampler_to_original(module)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    st.save_resampler(module, tmp_path / "r")
    again = st.load_resampler(tmp_path / "r")
    x = torch.randn(1, 5, TINY.embedding_dim)
    torch.testing.assert_close(again(x), module(x))
    with pytest.raises(ProxytuneError, match="missing"):
        stylear_convert.resampler_from_original({k: v for k, v in sd.items() if k != "layers.1.0.norm2.bias"}, dim_head=8)
    with pytest.raises(ProxytuneError, match="position embeddings"):
        stylear_convert.resampler_from_original({**sd, "pos_emb.weight": torch.zeros(257, 20)}, dim_head=8)
    with pytest.raises(ProxytuneError, match="dim_head"):
        stylear_convert.resampler_from_original(sd, dim_head=7)
    with pytest.raises(ProxytuneError, match="not a StyleAR resampler"):
        stylear_convert.resampler_from_original({"weight": torch.zeros(1)})


def test_resampler_reads_the_penultimate_clip_layer_and_gradients_reach_the_resampler():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=20, intermediate_size=40, num_hidden_layers=3,
                                                          num_attention_heads=2, image_size=32, patch_size=8,
                                                          projection_dim=16)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    feats = st.clip_style_features(clip, pixels)
    hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and torch.equal(feats, hidden[2]) and feats.shape == (2, 17, 20)
    module = stylear_convert.resampler_from_original(original_layout_state(TINY), dim_head=TINY.dim_head)
    module(feats.detach()).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_two_image_mode_is_the_originals_blend():
    module = stylear_convert.resampler_from_original(original_layout_state(TINY), dim_head=TINY.dim_head)
    e1, e2 = torch.randn(1, 6, 20), torch.randn(1, 6, 20)
    with torch.no_grad():
        ours = st.style_tokens_without_content(module, e1, e2)
        expected = 0.2 * module(e1) + 0.8 * module(e1 - 0.8 * e2)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


# -- style-enhanced tokens ----------------------------------------------------------------------------

def test_noise_strength_zero_is_clean_and_positive_is_deterministic_per_seed():
    tokens = torch.randn(1, 16, 64)
    assert torch.equal(st.style_enhanced(tokens, 0.0, torch.Generator().manual_seed(0)), tokens)
    a = st.style_enhanced(tokens, 0.3, torch.Generator().manual_seed(7))
    b = st.style_enhanced(tokens, 0.3, torch.Generator().manual_seed(7))
    c = st.style_enhanced(tokens, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs((a - tokens).std().item() - 0.3) < 0.03  # N(0, 0.3^2) per element
    z = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, tokens + 0.3 * z)
    with pytest.raises(ValueError):
        st.style_enhanced(tokens, -0.1)


# -- prompt and placeholders on the tiny Lumina-mGPT ---------------------------------------------

def test_the_prompt_is_the_originals_template():
    text = st.style_prompt("a red house", 16)
    assert text == ("Instant style Generation. Given image style is " + "S* " * 15 + "S*. Please generate an same "
                    "style image according to my instruction: a red house")


def test_placeholder_replacement_puts_style_tokens_exactly_at_the_placeholders():
    bundle = students.load_student("tiny-lumina-mgpt")
    prompts = ["a dog", "a cat on a mat", "a much longer prompt about a cat sitting on a mat by the door"]
    cond, positions = st.encode_style_prompts(bundle, prompts, num_tokens=4)
    ids, mask = cond[:, 0], cond[:, 1]
    star = bundle.tokenizer.convert_tokens_to_ids("*")
    for b in range(3):
        assert positions[b].tolist() == torch.nonzero(ids[b] == star).flatten().tolist()  # the "*" of each "S*"
        assert torch.all(mask[b, positions[b]] == 1)
        turn = ids[b][mask[b].bool()].tolist()
        assert turn[0] == bundle.tokenizer.bos_token_id and turn[-1] == bundle.end_of_turn
        text = bundle.tokenizer.decode(turn[1:-1])
        # the tiny's prompt_len (160) cuts the end of a long prompt's text, as encode_prompts does
        assert text == st.style_prompt(prompts[b], 4)[: bundle.prompt_len - 2]
    assert positions[0, 0] != positions[1, 0]  # left padding shifts the shorter turn
    ids, positions = ids[:2], positions[:2]
    style = torch.randn(2, 4, bundle._chameleon.config.hidden_size)
    plain = bundle._chameleon.get_input_embeddings()(ids)
    replaced = st.style_input_embeds(bundle, ids, positions, style)
    for b in range(2):
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[positions[b]] = False
        assert torch.equal(replaced[b, positions[b]], style[b])
        assert torch.equal(replaced[b, others], plain[b, others])
    # one set of tokens for the whole batch broadcasts
    shared = st.replace_placeholders(plain, positions, style[:1])
    assert torch.equal(shared[1, positions[1]], style[0])


def test_placeholder_positions_use_the_originals_id_when_the_tokenizer_has_it():
    class Stub:  # a tokenizer whose ids carry Chameleon's 16393 once per placeholder
        def __call__(self, text, add_special_tokens, return_offsets_mapping):
            ids = [5, 16393, 6, 16393, 7]
            return {"input_ids": ids, "offset_mapping": [(i, i + 1) for i in range(len(ids))]}

    ids, positions = st.placeholder_positions(Stub(), "x", num_tokens=2)
    assert positions == [1, 3]


def test_a_prompt_containing_the_placeholder_is_refused():
    bundle = students.load_student("tiny-lumina-mgpt")
    with pytest.raises(ProxytuneError, match="placeholder"):
        st.encode_style_prompts(bundle, ["an S* dog"], num_tokens=4)


def test_style_tokens_condition_the_tiny_lumina_and_the_unconditional_branch_ignores_them():
    bundle = students.load_student("tiny-lumina-mgpt")
    cond, positions = st.encode_style_prompts(bundle, ["a dog"], num_tokens=4)
    H = bundle._chameleon.config.hidden_size

    def last_state(style, masked):
        ids, mask = cond[:, 0], cond[:, 1].clone()
        if masked:
            mask[:] = 0
        ids = torch.cat([ids, bundle.image_prefix[None]], dim=1)
        mask = torch.cat([mask, torch.ones(1, 3, dtype=mask.dtype)], dim=1)
        embeds = st.style_input_embeds(bundle, ids, positions, style)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = bundle._chameleon(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        return out.last_hidden_state[0, -1]

    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(1, 4, H, generator=g), torch.randn(1, 4, H, generator=g)
    assert (last_state(s1, False) - last_state(s2, False)).abs().max() > 1e-3
    torch.testing.assert_close(last_state(s1, True), last_state(s2, True))


# -- StyleAR LoRA layout <-> peft ----------------------------------------------------------------------

def stylear_lora_state(model, r: int = 4, seed: int = 0) -> dict:
    """Random A (in, r), B (r, out) under StyleAR's names, for every module its solver wraps."""
    return stylear_release.lora_state(model, r, seed)


def test_stylear_lora_loads_into_peft_and_reproduces_the_originals_forward(tmp_path):
    from peft import PeftModel

    bundle = students.load_student("tiny-lumina-mgpt")
    model = bundle.model
    state = stylear_lora_state(model)
    ids = torch.tensor([[0, 9076, 9086, 9224, 9054, 9013, 8710, 8197]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    # the original: each wrapped module's output + input @ A @ B (LinearLora, no scaling)
    hooks = []
    for key in state:
        if key.endswith(".A"):
            parent, leaf = key[:-2].rsplit(".", 1)  # "model.layers.0.self_attn", "q_proj_lora"
            leaf = leaf.removesuffix("_lora")  # the wrapper's LoRA sits beside the wrapped linear
            module_name = parent if parent == leaf else f"{parent}.{leaf}"  # lm_head.lm_head_lora -> lm_head
            A, B = state[key], state[key[:-1] + "B"]
            module = model.get_submodule(module_name)
            hooks.append(module.register_forward_hook(lambda m, inp, out, A=A, B=B: out + inp[0] @ A @ B))
    with torch.no_grad():
        original = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    finite = base > torch.finfo(base.dtype).min
    assert (original - base)[finite].abs().max() > 1e-2  # the LoRA does something

    stylear_convert.write_peft_adapter(state, tmp_path / "adapter", base_model="tiny")
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 2 * 5 + 1  # q, k, v, o, down per layer + lm_head; nothing in the VQ
    with torch.no_grad():
        ours = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-4)


def test_stylear_lora_key_mapping_round_trips_and_refuses_strangers():
    bundle = students.load_student("tiny-lumina-mgpt")
    state = stylear_lora_state(bundle.model, r=3)
    peft_state, rank = stylear_convert.lora_to_peft(state)
    assert rank == 3
    assert torch.equal(peft_state["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"],
                       state["model.layers.1.self_attn.o_proj_lora.A"].t())
    assert peft_state["base_model.model.lm_head.lora_B.weight"].shape == (bundle.model.lm_head.out_features, 3)
    back = stylear_convert.lora_from_peft(peft_state)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ProxytuneError, match="not a StyleAR LoRA key"):
        stylear_convert.lora_to_peft({**state, "model.layers.0.mlp.up_proj_lora.A": torch.zeros(4, 3)})
    with pytest.raises(ProxytuneError, match="lacks its A or B"):
        stylear_convert.lora_to_peft({k: v for k, v in state.items() if k != "lm_head.lm_head_lora.B"})


# -- proxytune convert stylear ---------------------------------------------------------------------

class NotWeights:  # a pickled object torch.load(weights_only=True) must refuse
    pass


def test_convert_stylear_turns_a_released_layout_folder_into_adapter_and_resampler(tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel
    from proxytune.cli import main

    bundle = students.load_student("tiny-lumina-mgpt")
    lora = stylear_lora_state(bundle.model, r=4, seed=3)
    proj = original_layout_state(TINY, seed=4)
    released = tmp_path / "released"
    stylear_release.build(released, lora, proj, dtype=torch.float32, extra={"some.other.weight": torch.zeros(2)})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "stylear", str(released), str(out), "--base-model", "tiny",
                                       "--dim-head", str(TINY.dim_head)])
    assert result.exit_code == 0, result.output
    assert "rank 4 on 11 modules" in result.output and "1 non-LoRA keys ignored" in result.output
    meta = __import__("json").loads((out / "proxytune_style.json").read_text())
    assert meta["noise_strength"] == 0.3 and meta["cfg_scale"] == 4.0 and meta["num_style_tokens"] == TINY.num_queries
    # the resampler computes the original's forward
    resampler = st.load_resampler(out / "style_resampler")
    x = torch.randn(2, 5, TINY.embedding_dim)
    with torch.no_grad():
        torch.testing.assert_close(resampler(x), reference_resampler(proj, x, heads=TINY.heads), rtol=1e-5, atol=1e-5)
    # the adapter holds exactly StyleAR's LoRA
    peft_model = PeftModel.from_pretrained(bundle.model, str(out / "adapter"))
    from peft import get_peft_model_state_dict

    back = stylear_convert.lora_from_peft({f"base_model.model.{k.removeprefix('base_model.model.')}": v
                              for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()})
    assert set(back) == set(lora) and all(torch.equal(back[k], lora[k]) for k in lora)
    # a second run refuses to overwrite; a pickle that is not weights is refused in one line
    again = CliRunner().invoke(main, ["convert", "stylear", str(released), str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    torch.save({"latents": NotWeights()}, released / "image_proj.pth")
    bad = CliRunner().invoke(main, ["convert", "stylear", str(released), str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "weights only" in bad.output and not (tmp_path / "out2").exists()


# -- sampling: StyleAR's classifier-free guidance ----------------------------------------------------

def test_guided_sampling_is_the_originals_cfg_on_a_converted_stylear_model(tmp_path, monkeypatch):
    """StyleAR's sampler (inference_solver.py: its CFG logits processor first, then the image-token
    constraint, image top-k 2000, temperature 1; inference.py: cfg 4.0), restated here on the tiny
    Lumina-mGPT carrying a StyleAR LoRA (lm_head included) converted to peft:
      cond   = the whole sequence at positions 0, 1, ...: <s>, the style template with the style tokens'
               embeddings at the placeholders, end of turn, <racm3:break>, size, size, the codes so far with
               their row ends;
      uncond = that sequence from <racm3:break> on (the processor's input_ids[:, image_start:], attention all
               ones), at positions 0, 1, ...: no text and no style tokens (their indices lie beyond it);
      logits = the model's output, LoRA'd lm_head included, at the image tokens: uncond + 4 (cond - uncond).
    proxytune's cond and uncond logits at every code step, and the guided logits it samples from, equal these."""
    from peft import PeftModel
    from PIL import Image

    from proxytune.backends import encoders
    from proxytune.backends.students.lumina import backend as lumina
    from proxytune.backends.stylear.style_student import StyleStudent

    bundle = students.load_student("tiny-lumina-mgpt")
    stylear_convert.write_peft_adapter(stylear_lora_state(bundle.model, r=4, seed=5), tmp_path / "adapter", base_model="tiny")
    style = StyleStudent.build(bundle, encoders.load_clip("tiny-clip"), num_tokens=4, depth=1, heads=2, dim_head=8, seed=1)
    bundle.model = PeftModel.from_pretrained(bundle.model, str(tmp_path / "adapter")).eval()
    features = style.image_features([Image.new("RGB", (64, 64), (200, 30, 30))])
    seen, guided = [], []  # proxytune's [cond; uncond] code logits, and the logits it samples from, per code
    code_logits, sample_next = bundle._code_logits, lumina.sample_next
    monkeypatch.setattr(bundle, "_code_logits", lambda hidden: seen.append(code_logits(hidden)) or seen[-1])
    monkeypatch.setattr(lumina, "sample_next", lambda logits, *a, **k: guided.append(logits) or sample_next(logits, *a, **k))
    codes = style.generate(["a red boat"], features, [7], cfg_scale=4.0, top_k=2000, temperature=1.0, noise_strength=0.0)
    codes = codes[0].tolist()

    model = bundle.model.get_base_model()  # LoRA layers injected in place
    vocab = model.config.vocabulary_map
    K, g = bundle.codebook_size, bundle.grid
    image_ids = [vocab[lumina.image_token_name(c)] for c in range(K)]
    ids, positions = st.placeholder_positions(bundle.tokenizer, st.style_prompt("a red boat", 4), 4)
    prompt = [bundle.tokenizer.bos_token_id, *ids, vocab[lumina.END_OF_TURN]]
    assert len(prompt) <= style.prompt_len  # nothing cut
    image_start = [vocab[lumina.IMAGE_START], *[vocab[lumina.size_token(bundle.image_size)]] * 2]
    with torch.no_grad():
        tokens = style.resampler(features)[0]  # (4, H): noise_strength 0

        def original_logits(sequence: list[int], style_at: list[int]) -> torch.Tensor:
            embeds = model.get_input_embeddings()(torch.tensor([sequence]))
            embeds[0, style_at] = tokens[: len(style_at)]
            hidden = model.model(inputs_embeds=embeds).last_hidden_state[0, -1]  # positions 0.., causal, no padding
            return model.lm_head(hidden)[image_ids], model.lm_head.base_layer(hidden)[image_ids]

        assert len(seen) == len(guided) == g * g
        for t in range(g * g):
            body = []
            for i in range(t):
                body += [image_ids[codes[i]]] + ([vocab[lumina.ROW_END]] if i % g == g - 1 else [])
            cond, cond_base = original_logits(prompt + image_start + body, [1 + p for p in positions])
            uncond, _ = original_logits(image_start + body, [])
            torch.testing.assert_close(seen[t][0], cond, rtol=1e-4, atol=1e-4, msg=f"cond logits, code {t}")
            torch.testing.assert_close(seen[t][1], uncond, rtol=1e-4, atol=1e-4, msg=f"uncond logits, code {t}")
            torch.testing.assert_close(guided[t][0], uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
        assert (cond - cond_base).abs().max() > 1e-2  # the lm_head LoRA moves the code logits: it must be applied


def test_a_style_student_samples_with_styleARs_defaults_unless_the_spec_says_otherwise():
    """inference.py: create_logits_processor(cfg=4.0, image_top_k=2000), temperature 1.0 (not the base
    Lumina-mGPT solver's cfg 3.0); a spec's field wins."""
    from proxytune.backends.students.api import sampling_settings
    from proxytune.spec.student import SamplingSpec

    assert sampling_settings("stylear", SamplingSpec()) == {"cfg_scale": 4.0, "top_k": 2000, "temperature": 1.0}
    assert sampling_settings("stylear", SamplingSpec(top_k=20))["top_k"] == 20
    assert sampling_settings("lumina-mgpt", SamplingSpec())["cfg_scale"] == 3.0


def test_a_saved_style_students_adapter_config_names_the_spec_model_and_sorted_targets(tmp_path):
    """adapter_config.json carries the spec's model reference (set on the PeftConfig before saving, not
    the folder it resolved to) and its target modules in sorted order (peft keeps them in a set)."""
    import json

    from peft import LoraConfig, get_peft_model

    from proxytune.backends import encoders
    from proxytune.backends.stylear.style_student import StyleStudent

    bundle = students.load_student("tiny-lumina-mgpt")
    targets = bundle.lora_target_modules()
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    style = StyleStudent.build(bundle, encoders.load_clip("tiny-clip"), num_tokens=4, depth=1, heads=2, dim_head=8, seed=1)
    style.save(tmp_path, base_model="tiny-lumina-mgpt", clip_model="tiny-clip", noise_strength=0.0, sampling={})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-lumina-mgpt"
    assert config["target_modules"] == sorted(set(targets))
