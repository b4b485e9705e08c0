"""Prompts as Stable Diffusion users write them: AUTOMATIC1111's emphasis syntax, prompts of any length in chunks
of 75 tokens, ``BREAK``, and textual-inversion embeddings used as words.

Emphasis: ``(text)`` multiplies its tokens' weight by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies
it by 1.3 (any number, also below 1); brackets nest and multiply; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the
literal characters (a lone backslash is dropped); brackets left open are closed at the end; a ``)`` or ``]``
that closes nothing, and a ``:`` that starts no weight (``(a:x)``), are text. ``BREAK`` (upper case, as a word)
ends the current chunk. Unlike AUTOMATIC1111, a ``BREAK`` inside brackets still ends the chunk (there it becomes
the text "BREAK" with a negative weight).

Chunks: the tokens of a prompt (each fragment of equal weight tokenized on its own, as AUTOMATIC1111 does) are
cut into chunks of 75, each encoded as [start] + 75 tokens (padded with end-of-text) + [end]. When a chunk is
full and its last comma is at most 20 tokens back, the tokens after that comma move to the next chunk.
"""

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
CHUNK_TOKENS = 75  # text tokens per chunk: 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # a full chunk moves what follows its last comma to the next chunk if the comma is this close
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
ESCAPABLE = "()[]\\"


@dataclass
class Fragment:
    """A run of prompt text with one emphasis weight, or a chunk break (``is_break``)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_emphasis(prompt: str) -> list[Fragment]:
    """The prompt as fragments of equal weight, in order, with ``BREAK`` markers; never empty."""
    fragments: list[Fragment] = []
    open_round: list[int] = []
    open_square: list[int] = []
    start_new = True  # a bracket opened or closed since the last text: the next text starts a new fragment

    def add_text(text: str) -> None:
        nonlocal start_new
        if start_new or not fragments or fragments[-1].is_break:
            fragments.append(Fragment(text))
            start_new = False
        else:
            fragments[-1].text += text

    def close(stack: list[int], factor: float) -> None:
        nonlocal start_new
        for fragment in fragments[stack.pop():]:
            fragment.weight *= factor
        start_new = True

    position = 0
    while position < len(prompt):
        char = prompt[position]
        weight = WEIGHT.match(prompt, position) if char == ":" and open_round else None
        if char == "\\":
            following = prompt[position + 1:position + 2]
            if following and following in ESCAPABLE:
                add_text(following)
                position += 1
        elif char in "([":
            (open_round if char == "(" else open_square).append(len(fragments))
            start_new = True
        elif weight is not None and _is_number(weight.group(1)):
            close(open_round, float(weight.group(1)))
            position = weight.end() - 1
        elif char == ")" and open_round:
            close(open_round, ROUND_FACTOR)
        elif char == "]" and open_square:
            close(open_square, SQUARE_FACTOR)
        else:
            add_text(char)
        position += 1
    while open_round:
        close(open_round, ROUND_FACTOR)
    while open_square:
        close(open_square, SQUARE_FACTOR)
    return _merge(_split_breaks(fragments)) or [Fragment("")]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _split_breaks(fragments: list[Fragment]) -> list[Fragment]:
    result = []
    for fragment in fragments:
        for index, part in enumerate(BREAK_WORD.split(fragment.text)):
            if index:
                result.append(Fragment("BREAK", is_break=True))
            result.append(Fragment(part, fragment.weight))
    return result


def _merge(fragments: list[Fragment]) -> list[Fragment]:
    """Neighbours of equal weight joined; empty text dropped unless it stands between breaks."""
    merged: list[Fragment] = []
    for fragment in fragments:
        if merged and not fragment.is_break and not merged[-1].is_break and merged[-1].weight == fragment.weight:
            merged[-1].text += fragment.text
        elif fragment.is_break or fragment.text:
            merged.append(Fragment(fragment.text, fragment.weight, fragment.is_break))
    return merged


@dataclass
class Chunk:
    """77 positions: token ids, their weights, and the embedding vector that replaces a position's token, if any."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[torch.Tensor | None] = field(default_factory=list)

    def add(self, token: int, weight: float, vector: torch.Tensor | None = None) -> None:
        self.tokens.append(token)
        self.weights.append(weight)
        self.vectors.append(vector)

    def split(self, at: int) -> "Chunk":
        """Cut the tail from ``at`` off into a new chunk."""
        tail = Chunk(self.tokens[at:], self.weights[at:], self.vectors[at:])
        del self.tokens[at:], self.weights[at:], self.vectors[at:]
        return tail


Piece = int | torch.Tensor  # a token id, or an embedding's vectors (n, width) standing for n tokens


def chunk_prompt(fragments: list[Fragment], pieces_of: Callable[[str], list[Piece]], start: int, end: int,
                 comma: int) -> list[Chunk]:
    """The fragments' tokens in chunks of 77 (see the module docstring); ``pieces_of(text)`` tokenizes a fragment."""
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma: int | None = None

    def close() -> None:
        nonlocal current, last_comma
        padding = CHUNK_TOKENS - len(current.tokens)
        chunk = Chunk([start], [1.0], [None])
        for token, weight, vector in zip(current.tokens, current.weights, current.vectors):
            chunk.add(token, weight, vector)
        for _ in range(padding + 1):
            chunk.add(end, 1.0)
        chunks.append(chunk)
        current, last_comma = Chunk(), None

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for piece in pieces_of(fragment.text):
            if isinstance(piece, torch.Tensor):
                if len(current.tokens) + len(piece) > CHUNK_TOKENS:
                    close()
                for vector in piece:
                    current.add(end, fragment.weight, vector)
                continue
            if piece == comma:
                last_comma = len(current.tokens)
            elif (len(current.tokens) == CHUNK_TOKENS and last_comma is not None
                  and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK):
                tail = current.split(last_comma + 1)
                close()
                current = tail
            if len(current.tokens) == CHUNK_TOKENS:
                close()
            current.add(piece, fragment.weight)
    if current.tokens or not chunks:
        close()
    return chunks
