"""ldm/modules/encoders/prompts.py: AUTOMATIC1111's emphasis syntax and chunking, case by case.

The first cases are the examples in the docstring of AUTOMATIC1111's ``parse_prompt_attention``; the rest are the
edge cases its parser defines (nesting, escapes, unbalanced brackets, ``:`` in text, number forms, BREAK).
"""

import pytest

from ldm.modules.encoders.prompts import (CHUNK_TOKENS, ROUND_FACTOR, SQUARE_FACTOR, Fragment, chunk_prompt,
                                          parse_emphasis)

R, S = ROUND_FACTOR, SQUARE_FACTOR
BREAK = ("BREAK", None)
CASES = [
    # AUTOMATIC1111's documented examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", S * R), (" a ", R), ("hill", 0.5 * R),
      (", sun, ", R), ("sky", R * R * R * R), (".", R)]),  # 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1
    # plain and empty
    ("", [("", 1.0)]),
    ("a", [("a", 1.0)]),
    # brackets and nesting
    ("(a)", [("a", R)]),
    ("[a]", [("a", S)]),
    ("((a))", [("a", R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("(a [b] c)", [("a ", R), ("b", S * R), (" c", R)]),
    ("[(a)]", [("a", R * S)]),
    ("(a)(b)", [("ab", R)]),
    # explicit weights
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("(masterpiece:1.2), best quality", [("masterpiece", 1.2), (", best quality", 1.0)]),
    ("(a:1.5:2)", [("a:1.5", 2.0)]),  # the weight is the number before the closing bracket
    # ':' that starts no weight, and brackets that close nothing, are text
    ("(a:x)", [("a:x", R)]),
    ("a:1.5", [("a:1.5", 1.0)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("[a", [("a", S)]),
    ("(a:...)", [("a:...", R)]),  # not a number (AUTOMATIC1111 fails here)
    # escapes
    (r"\(a\)", [("(a)", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    (r"\((a)\)", [("(", 1.0), ("a", R), (")", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), BREAK]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("BREAKfast break BREAK", [("BREAKfast break", 1.0), BREAK]),
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),  # AUTOMATIC1111 turns this BREAK into text
]


@pytest.mark.parametrize("prompt, expected", CASES, ids=[case[0] or "empty" for case in CASES])
def test_emphasis_is_parsed_as_automatic1111(prompt, expected):
    parsed = [("BREAK", None) if fragment.is_break else (fragment.text, fragment.weight)
              for fragment in parse_emphasis(prompt)]
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    for (_, weight), (_, wanted) in zip(parsed, expected):
        assert weight == wanted or weight == pytest.approx(wanted, rel=1e-12)


START, END, COMMA = 1000, 1001, 9


def chunks_of(fragments, tokens):
    return chunk_prompt(fragments, lambda text: tokens[text], START, END, COMMA)


def test_chunks_are_75_tokens_between_start_and_end_padded_with_end():
    (chunk,) = chunks_of([Fragment("x", 1.5)], {"x": [5, 6]})
    assert chunk.tokens == [START, 5, 6] + [END] * 74 and len(chunk.tokens) == CHUNK_TOKENS + 2
    assert chunk.weights == [1.0, 1.5, 1.5] + [1.0] * 74
    first, second = chunks_of([Fragment("long")], {"long": list(range(100))})
    assert first.tokens == [START, *range(75), END] and second.tokens[:26] == [START, *range(75, 100)]


def test_a_full_chunk_moves_what_follows_its_last_comma_if_it_is_close():
    near = [2] * 60 + [COMMA] + [3] * 20  # the comma at 60: the 14 tokens after it move
    first, second = chunks_of([Fragment("t")], {"t": near})
    assert first.tokens[1:62] == [2] * 60 + [COMMA] and first.tokens[62:] == [END] * 15
    assert second.tokens[1:21] == [3] * 20
    far = [2] * 50 + [COMMA] + [3] * 30  # 24 tokens back: too far, cut at 75
    first, second = chunks_of([Fragment("t")], {"t": far})
    assert first.tokens[1:76] == far[:75] and second.tokens[1:7] == far[75:]


def test_break_pads_the_chunk_and_an_empty_prompt_is_one_empty_chunk():
    chunks = chunks_of([Fragment("BREAK", is_break=True), Fragment("a")], {"a": [5]})
    assert [chunk.tokens[1] for chunk in chunks] == [END, 5]
    (empty,) = chunks_of([Fragment("")], {"": []})
    assert empty.tokens == [START] + [END] * 76
