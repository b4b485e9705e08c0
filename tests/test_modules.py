"""The text encoders: CLIP tokenizer ids as open_clip's (padded with 49407 for v1, 0 for SD 2), outputs as
transformers' CLIPTextModel (v1) and CLIPTextModelWithProjection on diffusers' OpenCLIP conversion (SD 2)."""

import logging

import open_clip.tokenizer
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from safetensors.torch import save_file

from conftest import ROOT
from ldm.models.loading import build_model
from ldm.modules.encoders.modules import (END_OF_TEXT, START_OF_TEXT, FrozenCLIPEmbedder, clip_tokenizer,
                                          lend_attention_key)
from ldm.testing.diffusers_interop import (diffusers_pipeline, transformers_openclip_text_encoder,
                                           transformers_text_encoder)
from ldm.util import InputError, count_params, randomize_parameters_

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Hello, World!!! (masterpiece:1.2), [x] {y} & it's don't we'll",
    "café naïve — “curly quotes” and ’apostrophes’",
    "東京の夜景 🌃🚀 Москва ελληνικά",
    "&amp; &lt;b&gt; ＡＢＣ ﬁ",
    "<|endoftext|> typed into a prompt <|startoftext|>",
    "tabs\tand\nnewlines   and  spaces, 1234567890, user@example.com https://example.com/a?b=c",
    "very " * 100,
    "a " * 74 + "end",
]


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model) -> FrozenCLIPEmbedder:
    return tiny_model.cond_stage_model


def test_tokenizer_equals_open_clip_with_end_token_padding(tiny_embedder):
    reference = open_clip.tokenizer.SimpleTokenizer()(PROMPTS, context_length=77)
    reference[reference == 0] = END_OF_TEXT
    ours = tiny_embedder.tokenize(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, reference)
    assert (ours[:, 0] == START_OF_TEXT).all() and (ours[:, -1] == END_OF_TEXT).all()
    assert ours[1].tolist() == [START_OF_TEXT] + [END_OF_TEXT] * 76


def test_tokenizer_rejects_a_bare_string(tiny_embedder):
    with pytest.raises(TypeError):
        tiny_embedder.tokenize("a cat")


def test_v1_text_encoder_layout_loads_into_transformers(v1_meta_model):
    state_dict = v1_meta_model.state_dict()
    converted = convert_ldm_clip_checkpoint(state_dict)
    assert set(converted) == {k.removeprefix("cond_stage_model.transformer.") for k in state_dict
                              if k.startswith("cond_stage_model.")}
    config = v1_meta_model.cond_stage_model.transformer.text_model.config
    transformers_text_encoder(state_dict, config, meta=True)  # strict load
    assert count_params(v1_meta_model.cond_stage_model) == 123_060_480
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings, config.vocab_size, config.hidden_act) == (768, 12, 12, 3072, 77, 49408,
                                                                                        "quick_gelu")


@pytest.mark.parametrize("meta", [False, True])
def test_tiny_text_encoder_matches_transformers(tiny_model, tiny_embedder, meta):
    """``meta``: built without initialising, on our tensors (its position_ids are not in any state dict)."""
    reference = transformers_text_encoder(tiny_model.state_dict(), tiny_embedder.transformer.text_model.config,
                                          meta=meta)
    bracket_free = [prompt for prompt in PROMPTS if not set("()[]\\") & set(prompt)
                    and len(clip_tokenizer()(prompt).input_ids) <= 77]  # at most 75 tokens and the ends
    encoder = tiny_model.cond_stage_model
    try:
        with torch.no_grad():
            for emphasis, prompts in (("original", bracket_free), ("none", PROMPTS)):
                encoder.emphasis = emphasis
                ours = tiny_model.get_learned_conditioning(prompts)
                theirs = reference(input_ids=tiny_embedder.tokenize(prompts)).last_hidden_state
                assert ours.shape == (len(prompts), 77, 32)
                assert (ours - theirs).abs().max() <= 1e-4
    finally:
        encoder.emphasis = "original"


def test_embedder_is_frozen_and_in_eval_mode(tiny_model):
    tiny_model.train()
    try:
        assert not tiny_model.cond_stage_model.training
        assert not any(p.requires_grad for p in tiny_model.cond_stage_model.parameters())
        assert not tiny_model.first_stage_model.training
        assert tiny_model.model.training
    finally:
        tiny_model.eval()


def _keyed_tower() -> FrozenCLIPEmbedder:
    """A one-head, one-layer tower whose every query is the same vector c: tokens whose embedding holds c (here
    "left" and "right") get the attention, as a head of the demo model's text tower picks out "left"/"right"."""
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=1))
    layer, table = encoder.transformer.text_model.encoder.layers[0], encoder.token_embedding.weight
    common = torch.randn(32)
    with torch.no_grad():
        table.normal_(std=1.0)
        encoder.transformer.text_model.embeddings.position_embedding.weight.zero_()
        for word in ("left", "right"):
            table[clip_tokenizer()(word, add_special_tokens=False)["input_ids"][0]] += 2 * common
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.q_proj.bias.copy_(common)
        layer.self_attn.k_proj.weight.copy_(torch.eye(32))
        layer.self_attn.k_proj.bias.zero_()
    encoder.transformer.text_model.config._attn_implementation = "eager"
    return encoder


def test_a_lent_attention_key_makes_the_head_that_reads_a_word_read_another():
    """The end-of-text token's attention on "top" in "… top left …" before and after "top"/"bottom" borrow
    "left"/"right"'s key; the rows move by the formula, the rest of the table does not."""
    encoder = _keyed_tower()
    tokens = encoder.tokenize(["a circle in the top left corner"])
    top = tokens[0].tolist().index(clip_tokenizer()("top", add_special_tokens=False)["input_ids"][0])
    end = tokens[0].tolist().index(END_OF_TEXT)

    def attention_on_top() -> float:
        with torch.no_grad():
            attentions = encoder.transformer.text_model(input_ids=tokens, output_attentions=True).attentions
        return float(attentions[0][0, 0, end, top])

    before, table = attention_on_top(), encoder.token_embedding.weight.detach().clone()
    ids = [clip_tokenizer()(word, add_special_tokens=False)["input_ids"][0] for word in
           ("top", "bottom", "left", "right")]
    lend_attention_key(encoder, ["top", "bottom"], ["left", "right"], weight=1.0, spread=0.5)
    after = encoder.token_embedding.weight.detach()
    assert before < 0.05 and attention_on_top() > 0.3, (before, attention_on_top())
    own, lent = table[ids[:2]], table[ids[2:]].mean(dim=0)
    torch.testing.assert_close(after[ids[:2]], own + lent + 0.5 * (own - own.mean(dim=0)))
    unchanged = torch.ones(len(table), dtype=torch.bool)
    unchanged[ids[:2]] = False
    assert torch.equal(after[unchanged], table[unchanged])
    with pytest.raises(ValueError, match="not one"):
        lend_attention_key(encoder, ["topmost corner"], ["left"], weight=1.0)


def test_a_prompt_cut_to_77_tokens_is_reported_once_with_what_was_dropped(caplog):
    encoder = FrozenCLIPEmbedder(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2))
    long_prompt = "a photo of " + " ".join(["cat"] * 72) + " wearing a red hat"
    with caplog.at_level(logging.WARNING, logger="ldm"):
        tokens = encoder.tokenize([long_prompt, long_prompt, "short"])
        encoder.tokenize([long_prompt])
    assert tokens.shape == (3, 77) and tokens[0, -1] == END_OF_TEXT
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == ["a prompt is 4 tokens over the 75 that fit; dropped: 'wearing a red hat'"]


@pytest.fixture(scope="module")
def diffusers_text_pipeline(tiny_model, tiny_original_config):
    return diffusers_pipeline(tiny_model, tiny_original_config)


@pytest.fixture
def encoder(tiny_model):
    """The tiny model's text encoder, its prompt settings restored after each test."""
    encoder = tiny_model.cond_stage_model
    yield encoder
    encoder.clip_skip, encoder.emphasis, encoder.embeddings = 1, "original", {}


def features_by_hand(encoder, chunks) -> torch.Tensor:
    """Each chunk's ids through the plain text model, emphasis applied as the formula says, then concatenated."""
    pieces = []
    for chunk in chunks:
        z = encoder.transformer.text_model(input_ids=torch.tensor([chunk.tokens])).last_hidden_state
        weights = torch.tensor(chunk.weights)[None, :, None]
        pieces.append(z * weights * (z.mean() / (z * weights).mean()))
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def test_a_long_weighted_prompt_is_its_chunks_encoded_and_weighted_by_hand(encoder):
    prompt = "(a castle:1.3) on a hill, " + ", ".join(["tall trees"] * 30) + ", [fog]"
    chunks = encoder.chunks(prompt)
    assert len(chunks) == 2 and all(len(chunk.tokens) == 77 for chunk in chunks)
    ours = encoder([prompt])
    assert ours.shape == (1, 154, 32)
    torch.testing.assert_close(ours, features_by_hand(encoder, chunks), rtol=1e-5, atol=1e-5)
    assert chunks[0].weights[1:3] == [1.3, 1.3] and chunks[1].weights[chunks[1].tokens.index(END_OF_TEXT) - 1] == \
        pytest.approx(1 / 1.1)


@torch.no_grad()
def test_prompts_of_different_lengths_in_a_batch_get_empty_chunks(encoder):
    features = encoder(["a cat", " ".join(["cat"] * 100)])
    assert features.shape == (2, 154, 32)
    torch.testing.assert_close(features[0, 77:], encoder([""])[0])


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_clip_skip_is_the_hidden_state_before_the_last_layers_and_diffusers_clip_skip_minus_one(
        clip_skip, encoder, diffusers_text_pipeline):
    encoder.clip_skip = clip_skip
    prompts = ["a photograph of an astronaut riding a horse", "a cat"]
    ours = encoder(prompts)
    text_model = encoder.transformer.text_model
    hidden = text_model(input_ids=encoder.tokenize(prompts), output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours, text_model.final_layer_norm(hidden[-clip_skip]))
    theirs, _ = diffusers_text_pipeline.encode_prompt(prompts, "cpu", 1, False,
                                                      clip_skip=None if clip_skip == 1 else clip_skip - 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def write_embedding(path, vectors, layout):
    if layout == "a1111":
        torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vectors},
                    "name": path.stem, "step": 3000, "sd_checkpoint_name": "sd-v1-5"}, path)
    elif layout == "diffusers":
        torch.save({f"<{path.stem}>": vectors}, path)
    elif layout == "emb_params":
        save_file({"emb_params": vectors}, path)
    else:
        save_file({"anything": vectors}, path)


@pytest.mark.parametrize("layout, suffix", [("a1111", ".pt"), ("diffusers", ".bin"), ("emb_params", ".safetensors"),
                                            ("one tensor", ".safetensors")])
def test_every_embedding_format_loads(layout, suffix, encoder, tmp_path):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    write_embedding(tmp_path / f"shapey{suffix}", vectors, layout)
    assert encoder.load_embeddings(tmp_path) == ["shapey"]
    assert torch.equal(encoder.embeddings["shapey"], vectors)


@pytest.mark.parametrize("count", [1, 3])
@torch.no_grad()
def test_embeddings_give_diffusers_features_in_prompt_and_negative_prompt(count, encoder, diffusers_text_pipeline,
                                                                        tmp_path):
    vectors = torch.randn(count, 32, generator=torch.Generator().manual_seed(count))
    path = tmp_path / "shapey.pt"
    write_embedding(path, vectors, "a1111")
    encoder.load_embeddings(path)
    diffusers_text_pipeline.load_textual_inversion(str(path), token="shapey")
    try:
        prompts, negative = ["a photo of shapey on a table"], ["blurry, Shapey"]
        ours, ours_negative = encoder(prompts), encoder(negative)
        theirs, theirs_negative = diffusers_text_pipeline.encode_prompt(prompts, "cpu", 1, True,
                                                                        negative_prompt=["blurry, shapey"])
    finally:
        diffusers_text_pipeline.unload_textual_inversion()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_negative, theirs_negative, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_emphasis_applies_to_embedding_vectors_too(encoder, tmp_path):
    write_embedding(tmp_path / "shapey.safetensors", torch.randn(2, 32), "emb_params")
    encoder.load_embeddings(tmp_path)
    (chunk,) = encoder.chunks("a (shapey:1.4) cat")
    positions = [index for index, vector in enumerate(chunk.vectors) if vector is not None]
    assert positions == [2, 3] and [chunk.weights[i] for i in positions] == [1.4, 1.4]
    torch.testing.assert_close(encoder(["a (shapey:1.4) cat"]), features_by_hand_with_vectors(encoder, chunk))


def features_by_hand_with_vectors(encoder, chunk) -> torch.Tensor:
    text_model = encoder.transformer.text_model
    embedded = text_model.embeddings.token_embedding(torch.tensor([chunk.tokens])).clone()
    for index, vector in enumerate(chunk.vectors):
        if vector is not None:
            embedded[0, index] = vector
    hidden = text_model.embeddings(inputs_embeds=embedded)
    mask = torch.full((77, 77), float("-inf")).triu(1)[None, None]
    z = text_model.final_layer_norm(text_model.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state)
    weights = torch.tensor(chunk.weights)[None, :, None]
    return z * weights * (z.mean() / (z * weights).mean())


def test_bad_embeddings_are_one_clear_error_naming_the_file(encoder, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="broken.pt"):
        encoder.load_embeddings(tmp_path / "broken.pt")
    write_embedding(tmp_path / "sd2.safetensors", torch.randn(1, 1024), "emb_params")
    with pytest.raises(InputError, match="sd2.safetensors has vectors of width 1024, but this text encoder takes 32"):
        encoder.load_embeddings(tmp_path / "sd2.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refusing to load .*evil.pt"):
        encoder.load_embeddings(tmp_path / "evil.pt")


@torch.no_grad()
def test_emphasis_none_is_the_original_conditioning_and_long_prompts_have_no_limit(encoder):
    encoder.emphasis = "none"
    literal = encoder(["(a cat:1.3)"])
    assert torch.equal(literal, encoder._encode(encoder.tokenize(["(a cat:1.3)"])))
    encoder.emphasis = "original"
    assert not torch.allclose(literal, encoder(["(a cat:1.3)"]))
    assert encoder([" ".join(["cat"] * 10_000)]).shape == (1, 77 * 134, 32)  # 10 000 tokens: 134 chunks


# SD 2: open_clip's text tower (a tiny one with random weights; the full ViT-H/14 only as a layout on meta).
V2_TINY = ROOT / "configs/stable-diffusion/v2-tiny-v.yaml"


@pytest.fixture(scope="module")
def openclip_model():
    return randomize_parameters_(build_model(V2_TINY), seed=3).eval()


def test_sd2_tokens_are_open_clips_padded_with_zero(openclip_model):
    """SD 2 pads with 0 after the end token (open_clip's tokenizer); v1 pads with the end token."""
    encoder = openclip_model.cond_stage_model
    reference = open_clip.tokenizer.SimpleTokenizer()(PROMPTS, context_length=77)
    assert torch.equal(encoder.tokenize(PROMPTS), reference)
    assert encoder.tokenize([""])[0].tolist() == [START_OF_TEXT, END_OF_TEXT] + [0] * 75
    bracket_free = [prompt for prompt in PROMPTS if not set("()[]\\") & set(prompt)
                    and len(clip_tokenizer()(prompt).input_ids) <= 77]
    chunk_tokens = torch.tensor([encoder._padded(torch.tensor([encoder.chunks(p)[0].tokens]))[0].tolist()
                                 for p in bracket_free])
    assert torch.equal(chunk_tokens, open_clip.tokenizer.SimpleTokenizer()(bracket_free, context_length=77))


def test_sd2_text_encoder_matches_transformers_through_diffusers_converter(openclip_model):
    """Our open_clip tower, penultimate layer, against transformers' CLIPTextModel on the weights
    diffusers' ``convert_open_clip_checkpoint`` gives it (the tiny tower keeps all 3 blocks there, so its
    penultimate hidden state is read through the final LayerNorm by hand)."""
    encoder = openclip_model.cond_stage_model
    reference = transformers_openclip_text_encoder(openclip_model.state_dict(), encoder)
    bracket_free = [prompt for prompt in PROMPTS if not set("()[]\\") & set(prompt)
                    and len(clip_tokenizer()(prompt).input_ids) <= 77]
    with torch.no_grad():
        ours = openclip_model.get_learned_conditioning(bracket_free)
        hidden = reference(input_ids=encoder.tokenize(bracket_free), output_hidden_states=True).hidden_states[-2]
        theirs = reference.final_layer_norm(hidden)
        encoder.clip_skip = 2
        skipped = openclip_model.get_learned_conditioning(bracket_free)
        encoder.clip_skip = 1
        hidden = reference(input_ids=encoder.tokenize(bracket_free), output_hidden_states=True).hidden_states[-3]
    assert ours.shape == (len(bracket_free), 77, 32)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert (skipped - reference.final_layer_norm(hidden)).abs().max() <= 1e-4 * theirs.abs().max()


def test_sd2_text_encoder_layout_loads_strict_into_transformers():
    """The full ViT-H/14 tower (meta): diffusers' converter drops block 24, the projection and the logit scale; the
    rest loads strictly."""
    model = build_model(ROOT / "configs/stable-diffusion/v2-inference-v.yaml", meta=True)
    encoder = model.cond_stage_model
    reference = transformers_openclip_text_encoder(model.state_dict(), encoder, meta=True)
    config = reference.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == (1024, 23, 16, 4096, 49408)
    assert count_params(encoder) == 354_032_641  # 24 blocks, projection and logit scale, as the checkpoint
    assert count_params(reference) == 340_387_840  # 23 blocks: what diffusers' SD 2 text_encoder holds
    assert encoder.num_layers == 23 and encoder.width == 1024


def test_sd2_embeddings_go_in_place_of_their_word_as_with_v1(openclip_model, tmp_path):
    """A textual-inversion file's vectors replace the token embeddings of its word, before the positions are added
    and the (causal) blocks run; an embedding of v1's width is refused."""
    encoder = openclip_model.cond_stage_model
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, tmp_path / "thing.safetensors")
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(InputError, match="width 768"):
        encoder.load_embeddings(tmp_path / "wide.safetensors")
    assert encoder.load_embeddings(tmp_path / "thing.safetensors") == ["thing"]
    tower = encoder.model
    try:
        with torch.no_grad():
            ours = openclip_model.get_learned_conditioning(["a thing"])
            ids = torch.tensor([[START_OF_TEXT, clip_tokenizer()("a").input_ids[1], 0, 0, END_OF_TEXT] + [0] * 72])
            x = tower.token_embedding(ids)
            x[0, 2:4] = vectors
            x = x + tower.positional_embedding
            for block in tower.transformer.resblocks[:encoder.num_layers]:
                x = block(x, attn_mask=tower.attn_mask)
            expected = tower.ln_final(x)
        torch.testing.assert_close(ours, expected)
    finally:
        encoder.embeddings.clear()
