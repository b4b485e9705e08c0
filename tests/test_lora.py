"""ldm/models/lora.py: kohya/LyCORIS files merged as their definitions say, equal to diffusers' LoRA loader, and
taken out again bit for bit."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from ldm.models.lora import apply_loras, find_lora, take_lora_tags
from ldm.modules.winograd import set_winograd
from ldm.testing.diffusers_interop import diffusers_pipeline
from ldm.util import InputError

# kohya names (diffusers module paths) and the weights they are in our layout, written out by hand
ATTN_Q = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
FF = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
      "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight")
CONV = ("lora_unet_up_blocks_1_resnets_0_conv1", "model.diffusion_model.output_blocks.3.0.in_layers.2.weight")
TEXT_Q = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
          "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
TEXT_FC1 = ("lora_te_text_model_encoder_layers_1_mlp_fc1",
            "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight")
LAYERS = [ATTN_Q, FF, CONV, TEXT_Q, TEXT_FC1]


@pytest.fixture
def model(tiny_model):
    return copy.deepcopy(tiny_model)


def random(*shape, seed):
    return 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kohya_file(path, model, kind, layers=LAYERS, rank=4, alpha=2.0):
    """A LoRA file of ``kind`` for ``layers``, and the delta each weight should get at weight 1 (by the formula)."""
    tensors, deltas = {}, {}
    weights = dict(model.named_parameters())
    for seed, (kohya, ours) in enumerate(layers):
        shape = weights[ours].shape
        out, inner = shape[0], shape[1:].numel()
        if kind == "lora":
            kernel = shape[2:] if len(shape) == 4 else ()
            down, up = random(rank, shape[1], *kernel, seed=seed), random(out, rank, *([1, 1] if kernel else []),
                                                                          seed=seed + 50)
            tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / rank
        elif kind == "loha":
            w1a, w1b, w2a, w2b = (random(*s, seed=seed + k) for k, s in
                                  enumerate([(out, rank), (rank, inner), (out, rank), (rank, inner)]))
            tensors |= {f"{kohya}.hada_w1_a": w1a, f"{kohya}.hada_w1_b": w1b, f"{kohya}.hada_w2_a": w2a,
                        f"{kohya}.hada_w2_b": w2b}
            delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * alpha / rank
        else:  # lokr: w1 full (2 × 2), w2 = a @ b
            w1 = random(2, 2, seed=seed)
            w2a, w2b = random(out // 2, rank, seed=seed + 1), random(rank, inner // 2, seed=seed + 2)
            tensors |= {f"{kohya}.lokr_w1": w1, f"{kohya}.lokr_w2_a": w2a, f"{kohya}.lokr_w2_b": w2b}
            w2 = w2a @ w2b
            if len(shape) == 4:
                delta = torch.kron(w1[:, :, None, None], w2.reshape(out // 2, shape[1] // 2, *shape[2:]))
            else:
                delta = torch.kron(w1, w2)
            delta = delta.reshape(shape) * alpha / rank
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
        deltas[ours] = delta
    save_file(tensors, path)
    return deltas


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_each_kind_merges_as_its_definition_and_restores_bit_for_bit(kind, weight, model, tmp_path):
    deltas = kohya_file(tmp_path / f"{kind}.safetensors", model, kind)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    merged = apply_loras(model, [(tmp_path / f"{kind}.safetensors", weight)])
    after = model.state_dict()
    for name, value in after.items():
        expected = before[name] + weight * deltas[name] if name in deltas else before[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    merged.restore()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_two_loras_stack(model, tmp_path):
    first = kohya_file(tmp_path / "a.safetensors", model, "lora", layers=[ATTN_Q, FF])
    second = kohya_file(tmp_path / "b.safetensors", model, "loha", layers=[ATTN_Q])
    start = dict(model.named_parameters())[ATTN_Q[1]].detach().clone()
    apply_loras(model, [(tmp_path / "a.safetensors", 0.5), (tmp_path / "b.safetensors", 2.0)])
    torch.testing.assert_close(dict(model.named_parameters())[ATTN_Q[1]],
                               start + 0.5 * first[ATTN_Q[1]] + 2.0 * second[ATTN_Q[1]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight", [1.0, 0.6])
@torch.no_grad()
def test_the_unet_equals_diffusers_with_the_same_kohya_file(weight, model, tiny_original_config, tmp_path):
    unet_layers = [ATTN_Q, FF, CONV]
    kohya_file(tmp_path / "unet.safetensors", model, "lora", layers=unet_layers)
    pipeline = diffusers_pipeline(model, tiny_original_config)
    pipeline.load_lora_weights(str(tmp_path / "unet.safetensors"), adapter_name="style")
    pipeline.set_adapters(["style"], adapter_weights=[weight])
    apply_loras(model, [(tmp_path / "unet.safetensors", weight)])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    ours = model.apply_model(x, t, context)
    theirs = pipeline.unet(x, t, encoder_hidden_states=context).sample
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


@pytest.mark.parametrize("name", ["../../secret", "sub/style", ".hidden", "/etc/passwd"])
def test_a_tag_names_a_file_in_the_lora_folder_never_a_path(name, tmp_path):
    with pytest.raises(InputError, match="not by a path"):
        find_lora(name, tmp_path)


def test_prompt_tags_come_out_of_the_text():
    text, tags = take_lora_tags("a castle <lora:ink style:0.6>, at dawn <lora:detail>")
    assert text == "a castle , at dawn " and tags == [("ink style", 0.6), ("detail", 1.0)]
    with pytest.raises(InputError, match="must be a number"):
        take_lora_tags("<lora:ink:strong>")


def test_bad_lora_files_are_one_clear_error_and_leave_the_model_as_it_was(model, tmp_path):
    before = {name: value.clone() for name, value in model.state_dict().items()}
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "sdxl.safetensors")
    kohya_file(tmp_path / "good.safetensors", model, "lora", layers=[ATTN_Q])
    save_file({f"{FF[0]}.lora_down.weight": torch.zeros(4, 1280), f"{FF[0]}.lora_up.weight": torch.zeros(640, 4)},
              tmp_path / "wide.safetensors")
    for name, message in (("missing.safetensors", "not found"), ("broken.safetensors", "cannot read LoRA"),
                          ("sdxl.safetensors", "matches none of this model's layers"),
                          ("wide.safetensors", "does not fit this model's")):
        with pytest.raises(InputError, match=message):
            apply_loras(model, [(tmp_path / "good.safetensors", 1.0), (tmp_path / name, 1.0)])
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@torch.no_grad()
def test_a_merge_rebuilds_the_winograd_kernels_it_changes(model, tmp_path, monkeypatch):
    monkeypatch.setattr("ldm.modules.winograd.MIN_CHANNELS", 1)  # let the tiny UNet's 3×3 convolutions use it
    set_winograd(model, True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, context = torch.tensor([500.0]), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = model.apply_model(x, t, context)  # builds and caches every transformed kernel
    kohya_file(tmp_path / "conv.safetensors", model, "lora", layers=[CONV])
    apply_loras(model, [(tmp_path / "conv.safetensors", 1.0)])
    after = model.apply_model(x, t, context)
    set_winograd(model, False)
    direct = model.apply_model(x, t, context)  # the merged weights through the ordinary convolution
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, direct, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_half_precision_weights_merge_in_float32_and_restore_bit_for_bit(model, tmp_path):
    model.half()
    deltas = kohya_file(tmp_path / "a.safetensors", model, "loha", layers=[ATTN_Q, TEXT_FC1])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    merged = apply_loras(model, [(tmp_path / "a.safetensors", 0.7)])
    for name in deltas:
        expected = (before[name].float() + 0.7 * deltas[name]).half()
        assert torch.equal(model.state_dict()[name], expected)
    merged.restore()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@torch.no_grad()
def test_two_stacked_loras_equal_diffusers_with_both_adapters(model, tiny_original_config, tmp_path):
    kohya_file(tmp_path / "a.safetensors", model, "lora", layers=[ATTN_Q, CONV])
    kohya_file(tmp_path / "b.safetensors", model, "lora", layers=[ATTN_Q, FF], rank=2, alpha=1.0)
    pipeline = diffusers_pipeline(model, tiny_original_config)
    pipeline.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    pipeline.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    pipeline.set_adapters(["a", "b"], adapter_weights=[0.6, 1.0])
    apply_loras(model, [(tmp_path / "a.safetensors", 0.6), (tmp_path / "b.safetensors", 1.0)])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    ours = model.apply_model(x, torch.tensor([300.0]), context)
    theirs = pipeline.unet(x, torch.tensor([300.0]), encoder_hidden_states=context).sample
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


def test_diffusers_peft_keys_merge_like_kohya_keys(model, tmp_path):
    weight = dict(model.named_parameters())[ATTN_Q[1]]
    down, up = random(4, weight.shape[1], seed=1), random(weight.shape[0], 4, seed=2)
    peft_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{peft_name}.lora_A.weight": down, f"{peft_name}.lora_B.weight": up}, tmp_path / "peft.safetensors")
    start = weight.detach().clone()
    apply_loras(model, [(tmp_path / "peft.safetensors", 0.5)])
    torch.testing.assert_close(dict(model.named_parameters())[ATTN_Q[1]], start + 0.5 * up @ down)  # alpha = rank


def test_a_lora_pickle_that_would_run_code_is_refused(model, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({f"{ATTN_Q[0]}.lora_down.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refusing to load .*evil.pt"):
        apply_loras(model, [(tmp_path / "evil.pt", 1.0)])
