"""The text encoder: CLIP tokenizer ids as open_clip's (padded with 49407), outputs as transformers' CLIPTextModel."""

import logging

import open_clip.tokenizer
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

from ldm.modules.encoders.modules import END_OF_TEXT, START_OF_TEXT, FrozenCLIPEmbedder
from ldm.testing.diffusers_interop import transformers_text_encoder
from ldm.util import count_params

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
    prompts = PROMPTS[:4]
    with torch.no_grad():
        ours = tiny_model.get_learned_conditioning(prompts)
        theirs = reference(input_ids=tiny_embedder.tokenize(prompts)).last_hidden_state
    assert ours.shape == (4, 77, 32)
    assert (ours - theirs).abs().max() <= 1e-4


def test_embedder_is_frozen_and_in_eval_mode(tiny_model):
    tiny_model.train()
    try:
        assert not tiny_model.cond_stage_model.training
        assert not any(p.requires_grad for p in tiny_model.cond_stage_model.parameters())
        assert not tiny_model.first_stage_model.training
        assert tiny_model.model.training
    finally:
        tiny_model.eval()


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
