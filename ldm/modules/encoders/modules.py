"""Text conditioning for Stable Diffusion v1: the CLIP ViT-L/14 text tower, built from code, no hub.

The network is transformers' ``CLIPTextModel`` built from a config in code. Its weights come from the
Stable Diffusion checkpoint (``cond_stage_model.transformer.text_model.*``). The tokenizer is CLIP's byte-level
BPE, built from the vocabulary file that ships inside the ``open_clip_torch`` package.
"""

import functools
import gzip
import html
import importlib.util
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import ftfy
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

START_OF_TEXT = 49406
END_OF_TEXT = 49407

VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=START_OF_TEXT, eos_token_id=END_OF_TEXT, pad_token_id=END_OF_TEXT,
)

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, their end-of-word forms, merges, 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters, which BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def bpe_vocabulary_path() -> Path:
    """The BPE merges file inside the installed open_clip package (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it carries CLIP's BPE vocabulary")
    return Path(spec.submodule_search_locations[0]) / _BPE_FILE


@functools.lru_cache(maxsize=1)
@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer built in memory from open_clip's BPE file (ids identical to OpenAI CLIP's), once."""
    lines = gzip.open(bpe_vocabulary_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # split_special_tokens: a literal "<|endoftext|>" typed in a prompt is text, as in OpenAI's tokenizer.
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                         split_special_tokens=True)


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: repair mojibake and typography with ftfy, then unescape HTML twice."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class FrozenCLIPEmbedder(nn.Module):
    """Prompts → CLIP text features (B, 77, hidden), the ``last_hidden_state`` after the final LayerNorm.

    Tokens are [start, text…, end] padded to ``max_length`` with the end token (49407), as SD v1's tokenizer
    pads, truncated to ``max_length`` keeping the end token. No attention mask, as the original.
    ``text_config`` overrides fields of the ViT-L/14 text config (tests use a tiny tower).
    """

    def __init__(self, text_config: Mapping[str, Any] | None = None, max_length: int = 77, freeze: bool = True):
        super().__init__()
        config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **dict(text_config or {})})
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the text model's "
                             f"{config.max_position_embeddings} positions")
        self.max_length = max_length
        self._reported: set[str] = set()  # prompts already checked for length
        # transformers 5 flattened CLIPTextModel; the extra level keeps the checkpoint's
        # "transformer.text_model.*" names, so original weights load with no renaming.
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(config)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """LongTensor (B, max_length) of token ids; a prompt cut to fit is reported once, with what was dropped."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of prompts, not a single string")
        tokenizer = clip_tokenizer()
        cleaned = [clean_text(t) for t in texts]
        unseen = [text for text in dict.fromkeys(cleaned) if text not in self._reported]
        for text, ids in zip(unseen, tokenizer(unseen)["input_ids"] if unseen else []):
            self._reported.add(text)
            if len(ids) > self.max_length:
                dropped = tokenizer.decode(ids[self.max_length - 1:-1])
                logger.warning("a prompt is %d tokens over the %d that fit; dropped: %r", len(ids) - self.max_length,
                               self.max_length - 2, dropped)
        return tokenizer(cleaned, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        text_model = self.transformer.text_model
        tokens = self.tokenize(texts).to(text_model.device)
        return text_model(input_ids=tokens).last_hidden_state

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self(texts)
