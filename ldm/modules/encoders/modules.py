"""Text conditioning for Stable Diffusion: CLIP text towers built from code, no hub.

SD v1: transformers' ``CLIPTextModel`` (ViT-L/14's text tower) built from a config in code, its weights from the
checkpoint's ``cond_stage_model.transformer.text_model.*``. SD 2: open_clip's ViT-H-14 text tower, built from the
architecture config inside the open_clip package, its weights from ``cond_stage_model.model.*``. Both read CLIP's
byte-level BPE, built from the vocabulary file that ships inside the ``open_clip_torch`` package; prompt syntax,
long prompts and textual-inversion embeddings are shared (:class:`PromptEncoder`).
"""

import functools
import gzip
import html
import importlib.util
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import ftfy
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.models.loading import read_safely
from ldm.modules.encoders.prompts import CHUNK_TOKENS, Chunk, Piece, chunk_prompt, parse_emphasis
from ldm.util import InputError, ParameterError

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


EMPHASIS_MODES = ("original", "none")
COMMA = 267  # the token of ",</w>"


class PromptEncoder(nn.Module):
    """Prompts → text features (B, 77·k, width) for a CLIP text tower; what SD v1's and SD 2's encoders share.

    ``emphasis`` ``"original"`` (the default): prompts in AUTOMATIC1111's syntax (:mod:`.prompts`), of any length
    in chunks of 77 encoded separately and concatenated, the words of loaded textual-inversion embeddings replaced by
    their vectors, and each token's emphasis weight w applied after the encoder as AUTOMATIC1111's "Original"
    emphasis: z ← z·w, then z ← z·mean(z before)/mean(z after), per prompt and chunk. A prompt of at most 75
    tokens without brackets gives exactly the original's features. ``"none"``: the original's conditioning byte for
    byte — brackets are text and a prompt is cut at 77 tokens (:meth:`tokenize`).
    ``clip_skip`` N: the features N − 1 layers before the tower's usual output layer.

    A subclass gives the tower: ``width``, ``num_layers``, ``token_embedding`` (where embedding vectors go in),
    ``pad_token`` (what follows the first end-of-text token) and ``_features(tokens, clip_skip)``.
    """

    pad_token = END_OF_TEXT

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length
        self.clip_skip = 1
        self.emphasis = "original"
        self.embeddings: dict[str, torch.Tensor] = {}  # word (lower case) → vectors (n, width)
        self._reported: set[str] = set()  # prompts already checked for length

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
        tokens = tokenizer(cleaned, padding="max_length", max_length=self.max_length, truncation=True,
                           return_tensors="pt").input_ids
        return self._padded(tokens)

    def _padded(self, tokens: torch.Tensor, placeholders: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` with every position after the first end-of-text token set to :attr:`pad_token` (open_clip's
        tokenizer pads with 0, CLIP's with end-of-text; AUTOMATIC1111 does the same for SD 2). ``placeholders``
        (bool, like ``tokens``) marks the positions of embedding vectors, whose ids are not text."""
        if self.pad_token == END_OF_TEXT:
            return tokens
        is_end = (tokens == END_OF_TEXT) & (True if placeholders is None else ~placeholders)
        after_end = is_end.long().cumsum(dim=1) - is_end.long() > 0
        return tokens.masked_fill(after_end, self.pad_token)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if self.emphasis not in EMPHASIS_MODES:
            raise ParameterError("emphasis", f"must be one of {', '.join(EMPHASIS_MODES)}, got {self.emphasis!r}")
        if self.emphasis == "none":
            return self._encode(self.tokenize(texts))
        chunked = [self.chunks(text) for text in texts]
        count = max(map(len, chunked))
        empty = self.chunks("")[0]  # fills prompts with fewer chunks: [start] + 76 × [end]
        for chunks in chunked:
            chunks += [empty] * (count - len(chunks))
        return torch.cat([self._encode_chunks([chunks[k] for chunks in chunked]) for k in range(count)], dim=1)

    def chunks(self, text: str) -> list[Chunk]:
        """The prompt's chunks: 77 token ids each, their weights and embedding vectors."""
        return chunk_prompt(parse_emphasis(text), self._pieces, START_OF_TEXT, END_OF_TEXT, COMMA)

    def _pieces(self, text: str) -> list[Piece]:
        """A fragment's token ids, with each embedding word as its vectors."""
        parts = self._embedding_words.split(text) if self.embeddings else [text]
        pieces: list[Piece] = []
        for index, part in enumerate(parts):
            if index % 2:
                pieces.append(self.embeddings[part.lower()])
            elif part.strip():
                pieces += clip_tokenizer()(clean_text(part), add_special_tokens=False)["input_ids"]
        return pieces

    def _encode_chunks(self, chunks: list[Chunk]) -> torch.Tensor:
        placeholders = torch.tensor([[vector is not None for vector in chunk.vectors] for chunk in chunks])
        tokens = self._padded(torch.tensor([chunk.tokens for chunk in chunks]), placeholders)
        vectors = {(row, column): vector for row, chunk in enumerate(chunks)
                   for column, vector in enumerate(chunk.vectors) if vector is not None}
        z = self._encode(tokens, vectors)
        weights = torch.tensor([chunk.weights for chunk in chunks], dtype=z.dtype, device=z.device)
        if not (weights == 1).all():
            before = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[..., None]
            z = z * (before / z.mean(dim=(1, 2), keepdim=True))
        return z

    def _encode(self, tokens: torch.Tensor, vectors: Mapping[tuple[int, int], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Token ids (B, 77) → features at ``clip_skip``, with ``vectors`` in place of the token embeddings at
        those (row, column) positions."""
        if not 1 <= self.clip_skip <= self.num_layers:
            raise ParameterError("clip_skip", f"must be between 1 and {self.num_layers} for this text encoder, got "
                                 f"{self.clip_skip}")

        def insert_vectors(module: nn.Module, inputs: Any, embedded: torch.Tensor) -> torch.Tensor:
            embedded = embedded.clone()
            for (row, column), vector in vectors.items():
                embedded[row, column] = vector.to(embedded.dtype)
            return embedded

        hook = self.token_embedding.register_forward_hook(insert_vectors) if vectors else None
        try:
            return self._features(tokens.to(self.token_embedding.weight.device), self.clip_skip)
        finally:
            if hook is not None:
                hook.remove()

    def load_embeddings(self, path: str | Path) -> list[str]:
        """Textual-inversion embeddings from one file or every file of a directory, each usable as the word of
        its file name; returns the words added. See :func:`read_embedding` for the formats."""
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix in EMBEDDING_SUFFIXES) if path.is_dir() else [path]
        words = []
        for file in files:
            vectors = read_embedding(file)
            if vectors.shape[-1] != self.width:
                raise InputError(f"embedding {file} has vectors of width {vectors.shape[-1]}, but this text encoder "
                                 f"takes {self.width} (an embedding for another model?)")
            self.embeddings[file.stem.lower()] = vectors.float()
            words.append(file.stem)
        names = sorted(self.embeddings, key=len, reverse=True)  # the longest first, so "bad" cannot win over "bad2"
        self._embedding_words = re.compile(r"(?<![\w])(" + "|".join(map(re.escape, names)) + r")(?![\w])",
                                           re.IGNORECASE)
        return words

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self(texts)


class FrozenCLIPEmbedder(PromptEncoder):
    """SD v1's text encoder: transformers' ``CLIPTextModel`` (ViT-L/14's text tower, or ``text_config``'s overrides
    of it for tests), its features the ``last_hidden_state`` (``clip_skip`` N: the hidden state N − 1 layers before
    the last, after the final LayerNorm)."""

    def __init__(self, text_config: Mapping[str, Any] | None = None, max_length: int = 77, freeze: bool = True):
        super().__init__(max_length)
        config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **dict(text_config or {})})
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the text model's "
                             f"{config.max_position_embeddings} positions")
        # transformers 5 flattened CLIPTextModel; the extra level keeps the checkpoint's
        # "transformer.text_model.*" names, so original weights load with no renaming.
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(config)
        if freeze:
            self.freeze()

    @property
    def width(self) -> int:
        return self.transformer.text_model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.transformer.text_model.config.num_hidden_layers

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def _features(self, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
        text_model = self.transformer.text_model
        out = text_model(input_ids=tokens, output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            return out.last_hidden_state
        return text_model.final_layer_norm(out.hidden_states[-clip_skip])


class OpenCLIPTextTower(nn.Module):
    """open_clip's text tower in the layout SD 2 checkpoints store (``cond_stage_model.model.*``: the CLIP model
    without its vision tower): token and position embeddings, open_clip's own residual attention blocks
    (``transformer.resblocks.N``), ``ln_final``, ``text_projection`` and ``logit_scale`` (both unused for
    conditioning, kept so the checkpoint loads whole), and a causal attention mask."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 1024, heads: int = 16,
                 layers: int = 24, embed_dim: int = 1024, mlp_ratio: float = 4.0):
        super().__init__()
        from open_clip.transformer import Transformer

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, batch_first=True)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # open_clip's initialisation
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
        """The hidden states after the first ``blocks`` residual blocks, then ``ln_final``: (B, L, width)."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        for block in self.transformer.resblocks[:blocks]:
            x = block(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


OPENCLIP_LAYERS = {"last": 0, "penultimate": 1}  # blocks left out before ln_final


class FrozenOpenCLIPEmbedder(PromptEncoder):
    """SD 2's text encoder: open_clip's ``arch`` text tower (ViT-H-14: 24 blocks of width 1024), built from the
    architecture's config inside the open_clip package, never downloaded (``version``, the pretrained tag, is read
    and ignored: the weights come from the checkpoint). ``layer="penultimate"`` as SD 2 uses it: the hidden state
    after 23 of the 24 blocks, through ``ln_final``. Token ids are CLIP's BPE (the same vocabulary), padded with 0
    after the end-of-text token as open_clip's tokenizer does. ``text_config`` overrides fields of the tower's
    config (``width``, ``heads``, ``layers``, …) for tests.
    """

    pad_token = 0

    def __init__(self, arch: str = "ViT-H-14", version: str | None = None, device: str | None = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last",
                 text_config: Mapping[str, Any] | None = None):
        super().__init__(max_length)
        if layer not in OPENCLIP_LAYERS:
            raise ValueError(f"layer must be one of {', '.join(OPENCLIP_LAYERS)}, got {layer!r}")
        import open_clip

        architecture = open_clip.get_model_config(arch)
        if architecture is None:
            raise ValueError(f"open_clip has no architecture {arch!r}")
        text = {key: value for key, value in architecture["text_cfg"].items()
                if key in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
        text = {"embed_dim": architecture["embed_dim"], **text, **dict(text_config or {})}
        if max_length > text["context_length"]:
            raise ValueError(f"max_length {max_length} exceeds the text model's {text['context_length']} positions")
        self.layer = layer
        self.model = OpenCLIPTextTower(**text)
        if freeze:
            self.freeze()

    @property
    def width(self) -> int:
        return self.model.token_embedding.embedding_dim

    @property
    def num_layers(self) -> int:
        return len(self.model.transformer.resblocks) - OPENCLIP_LAYERS[self.layer]

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def _features(self, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
        return self.model(tokens, self.num_layers - (clip_skip - 1))


EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path: Path) -> torch.Tensor:
    """A textual-inversion embedding's vectors (n, width), read by the checkpoint loader's safe reader (no pickled
    code runs): AUTOMATIC1111's ``.pt``/``.bin`` (``string_to_param``, one entry), ``.safetensors`` with
    ``emb_params`` or a single tensor, and diffusers' ``{token: vector(s)}`` ``.bin``."""
    content = read_safely(path, what="embedding")
    if isinstance(content, Mapping) and isinstance(content.get("string_to_param"), Mapping):
        content = content["string_to_param"]
    if isinstance(content, Mapping) and "emb_params" in content:
        content = {"emb_params": content["emb_params"]}
    tensors = [value for value in content.values() if isinstance(value, torch.Tensor)] if isinstance(
        content, Mapping) else []
    if len(tensors) != 1:
        raise InputError(f"embedding {path} holds {len(tensors)} tensors where a textual-inversion file holds one")
    vectors = tensors[0].detach().reshape(-1, tensors[0].shape[-1]) if tensors[0].dim() else tensors[0]
    if vectors.dim() != 2 or not 1 <= len(vectors) <= CHUNK_TOKENS or not vectors.is_floating_point():
        raise InputError(f"embedding {path} is not 1 to {CHUNK_TOKENS} vectors (shape {tuple(tensors[0].shape)})")
    return vectors


def lend_attention_key(encoder: PromptEncoder, words: Sequence[str], like: Sequence[str], weight: float,
                       spread: float = 0.0) -> None:
    """Move the embeddings of ``words`` towards the mean of ``like``'s, so attention heads that pick ``like`` out of a
    prompt pick ``words`` too: e ← e + weight·mean(e_like) + spread·(e − mean(e_words)), per word of ``words``.

    A remedy for a learned blind spot (the demo model, README "Tenth sitting"): a small text tower's few heads
    carry each attribute of the caption to the end-of-text tokens, where the UNet reads them; when no head carries
    a word, neither network has a gradient to start carrying it (the UNet does not react to it, so the tower is not
    asked to pass it on). Sharing the key of words a head already carries puts them into its output; ``spread``
    widens the words' differences, which the shared part would otherwise dilute after the layer norm. Each word
    must be one token of the vocabulary.
    """
    def token(word: str) -> int:
        ids = clip_tokenizer()(clean_text(word), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens, not one")
        return ids[0]

    if not words or not like:
        raise ValueError(f"words and like each need a word, got {list(words)} and {list(like)}")
    table = encoder.token_embedding.weight
    with torch.no_grad():
        lent = table[[token(word) for word in like]].mean(dim=0)
        rows = [token(word) for word in words]
        own = table[rows]
        table[rows] = own + weight * lent + spread * (own - own.mean(dim=0))
