"""The SDK's incremental detokenizer gives, after every token, exactly the text of decoding the
whole list, while each decode covers only the last few tokens. Runs on the host: the module is
plain Python, loaded from its file, with the real SmolLM2 tokenizer."""
import importlib.util
from pathlib import Path

import pytest

from workers.tokenizer import Tokenizer

_PATH = Path(__file__).resolve().parent.parent / "inferlets" / "sdk" / "pie_sdk" / "detokenize.py"
_spec = importlib.util.spec_from_file_location("pie_sdk_detokenize", _PATH)
detokenize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(detokenize)

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, and for its cafés; "
    "the city has about 2.1 million inhabitants (2023).\n\nAnother paragraph follows here.",
    "日本語のテキストと中文文本, mixed with English words and emoji 👍🏽🎉 and 🇫🇷 flags.",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # code, with   odd   spacing\t\ttabs",
    "Ünïcödé àçcénts, Ελληνικά, русский текст, עברית, العربية — dashes… and “quotes”.",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return Tokenizer(smollm2.tokenizer)


def _stream(decode, ids):
    calls = []
    text = detokenize.IncrementalText(lambda tokens: calls.append(len(tokens)) or decode(tokens))
    return [text.append(t) for t in ids], calls


@pytest.mark.parametrize("source", TEXTS)
def test_every_prefix_reads_as_the_whole_decode(tokenizer, source):
    ids = tokenizer.encode(source)
    texts, calls = _stream(tokenizer.decode, ids)
    assert texts == [tokenizer.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert texts[-1] == source
    # linear, not quadratic: a decode covers the window and its context (a window moves up only
    # where the text ends in a whole character, so it may run a few tokens longer), never the list
    assert max(calls) <= detokenize.WINDOW + detokenize.CONTEXT + 8 < len(ids)
    assert len(calls) <= len(ids) + len(ids) // detokenize.WINDOW + 1


def test_a_decoder_that_rewrites_across_tokens_falls_back_to_the_whole_list(tokenizer):
    """A decoder that strips a leading space (as sentencepiece does), joins " ." to "." and turns
    ". Hello" into "! Hello", changing text already committed when a window starts at " Hello":
    still the whole list's text after every token."""
    decode = lambda tokens: tokenizer.decode(tokens).lstrip(" ").replace(" .", ".").replace(". Hello", "! Hello")
    ids = []
    for word in (" Hello", " world", " .", " This", " is", " a", " test", " .") * 6:
        ids += tokenizer.encode(word)
    assert len(ids) == 48 and decode(ids[:17]).endswith("! Hello")  # a window starts at 16: " Hello"
    texts, _ = _stream(decode, ids)
    assert texts == [decode(ids[:k]) for k in range(1, len(ids) + 1)]
