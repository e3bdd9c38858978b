"""Grammar-constrained decoding on the host, on top of llguidance.

A `GrammarCompiler` is built once per model (it owns llguidance's view of the tokenizer, which
takes 0.2 s to build for SmolLM2's 49k tokens and is shared by every matcher). `compile(kind, source)` turns an
inferlet's grammar into a `GrammarMatcher`, one per sequence, which says which tokens may come
next (`allowed_bitmask`) and follows the tokens that were chosen (`accept`, `rollback`, `reset`).

Kinds of grammar (`GRAMMAR_KINDS`):

- "json-schema": a JSON Schema document (llguidance's subset; an "x-guidance" key in the schema
  sets its JSON options, e.g. whitespace).
- "regex": a regular expression in Rust `regex` syntax; the whole output must match it.
- "lark": an EBNF grammar in Lark syntax, llguidance's native format.
- "gbnf": an EBNF grammar in llama.cpp's GBNF syntax (converted to Lark).

Grammars come from untrusted inferlet code, so what one may cost the host is bounded: the source
is at most MAX_GRAMMAR_BYTES, and llguidance's parser limits (`PARSER_LIMITS`) cap the grammar's
size after expansion, the regex work at compile time and per token, the Earley items per token,
and the lexer states a matcher may build (its memory). A grammar that exceeds a limit fails to
compile, or, when it is found during generation, makes `allowed_bitmask` or `accept` raise
GrammarError, after which the matcher refuses everything.

A matcher is not thread-safe: one sequence, one thread at a time.
"""
from __future__ import annotations

import threading

import llguidance
import llguidance.numpy
import numpy as np

from cluster.errors import GrammarError
from workers.tokenizer import Tokenizer

GRAMMAR_KINDS = ("json-schema", "regex", "lark", "gbnf")
MAX_GRAMMAR_BYTES = 64 * 1024  # of the UTF-8 source

_LLGUIDANCE_FORMAT = {"json-schema": "json_schema", "regex": "regex", "lark": "lark", "gbnf": "gbnf"}
_MAX_ERROR_CHARS = 2000  # llguidance's messages are kept, cut to this length

# llguidance's defaults, lowered where a short hostile source costs much: the regex work before
# the first mask (1M: `(a{1000}){1000}` took 0.9 s here, 300k: 0.15 s), the lexer states (~1-2 kB
# each) and the grammar's size (250k and 500k by default). The speeds are llguidance's figures.
PARSER_LIMITS = dict(
    max_items_in_row=2_000,  # branching of one grammar row (e.g. alternatives of one rule)
    initial_lexer_fuel=300_000,  # regex work to build the lexer (~50k/ms)
    step_lexer_fuel=200_000,  # regex work per token (~14k/ms: ~15 ms)
    step_max_items=50_000,  # Earley items per token (~20k/ms: ~2.5 ms)
    max_lexer_states=50_000,  # lexer states per matcher (~50-100 MB)
    max_grammar_size=200_000,  # symbols in the grammar's productions after expansion
    verbose_errors=False,  # messages without parser-state dumps
)


def _clip(message: str) -> str:
    message = message.replace("<non-verbose/>", "").strip()  # llguidance's marker for verbose_errors=False
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " ..."


class GrammarCompiler:
    """Compiles grammars against one model's tokenizer; thread-safe, build one per model.

    `vocab_size` is the model's (the size of its logits, the bitmask's length in bits); it may
    differ from the tokenizer's: tokens the tokenizer lacks are never allowed. `stop_token_ids`
    are the tokens that end generation: a matcher allows them once its grammar is complete.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...] | list[int]):
        stops = tuple(int(t) for t in stop_token_ids)
        if not stops:
            raise ValueError("a GrammarCompiler needs at least one stop token to end a complete grammar")
        if any(not 0 <= t < vocab_size for t in stops):
            raise ValueError(f"stop tokens {stops} must lie in the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.stop_token_ids = stops
        self._tokenizer = tokenizer
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._llg_tokenizer_lock = threading.Lock()

    def _shared_llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._llg_tokenizer_lock:
            if self._llg_tokenizer is None:
                # the larger of the two sizes, so that neither llguidance nor the bitmask misses a token
                llg_vocab_size = max(self.vocab_size, self._tokenizer.vocab_size)
                try:
                    self._llg_tokenizer = llguidance.LLTokenizer(
                        self._tokenizer.spec.tokenizer_json, n_vocab=llg_vocab_size,
                        eos_token=list(self.stop_token_ids))
                except Exception as e:  # llguidance raises plain exceptions of several types
                    raise GrammarError(f"this model's tokenizer cannot drive grammars (llguidance: {_clip(str(e))}); "
                                       "generate without a grammar on this model") from e
            return self._llg_tokenizer

    def compile(self, kind: str, source: str) -> GrammarMatcher:
        """A matcher at the start of the grammar `source` of `kind` (one of GRAMMAR_KINDS).

        Raises GrammarError for an unknown kind, a source over MAX_GRAMMAR_BYTES, or a source
        that is not a valid grammar of its kind (the message keeps llguidance's explanation).
        """
        if kind not in _LLGUIDANCE_FORMAT:
            raise GrammarError(f"unknown grammar kind {kind!r}; use one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(source, str):
            raise GrammarError(f"a {kind} grammar must be text, not {type(source).__name__}")
        size = len(source.encode("utf-8", errors="surrogatepass"))
        if size > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"the {kind} grammar is {size} bytes, over the limit of {MAX_GRAMMAR_BYTES}; "
                               "shorten it (e.g. fewer alternatives or a looser schema)")
        try:
            grammar = llguidance.grammar_from(_LLGUIDANCE_FORMAT[kind], source)
        except ValueError as e:  # not JSON (json-schema), or GBNF that does not convert to Lark
            raise GrammarError(f"invalid {kind} grammar: {_clip(str(e))}; fix it and compile again") from e
        llg_tokenizer = self._shared_llg_tokenizer()
        matcher = llguidance.LLMatcher(llg_tokenizer, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**PARSER_LIMITS))
        if matcher.is_error():
            raise GrammarError(f"invalid {kind} grammar: {_clip(matcher.get_error())}; fix it and compile again")
        return GrammarMatcher(matcher, llg_tokenizer, kind, self.vocab_size, self.stop_token_ids)


class GrammarMatcher:
    """Where one sequence stands in its grammar. Made by GrammarCompiler.compile."""

    def __init__(self, matcher: llguidance.LLMatcher, llg_tokenizer: llguidance.LLTokenizer, kind: str,
                 vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.kind = kind
        self.vocab_size = vocab_size
        self._matcher = matcher
        self._llg_tokenizer = llg_tokenizer
        self._stop_token_ids = frozenset(stop_token_ids)
        self._llg_bitmask = llguidance.numpy.allocate_token_bitmask(1, llg_tokenizer.vocab_size)  # [1, words] int32
        self._num_words = -(-vocab_size // 32)
        # bits of the last word that are tokens of the model (all 32 when vocab_size % 32 == 0)
        self._last_word_bits = (1 << (vocab_size - 32 * (self._num_words - 1))) - 1
        # per accepted token: whether llguidance recorded it (a stop token fed to a stopped
        # matcher is not), so that rollback undoes exactly what was recorded
        self._recorded: list[bool] = []

    def allowed_bitmask(self) -> list[int]:
        """The tokens that may come next: ceil(vocab_size / 32) u32 words; bit t % 32 of word t // 32 is token t.

        Once the grammar is complete the stop tokens are set; once nothing else can follow, only they are.
        Raises GrammarError if the grammar hit one of its limits (it cannot go on).
        """
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._llg_bitmask)
        if self._matcher.is_error():  # llguidance still sets the stop tokens then: do not let that pass as "finished"
            raise GrammarError(f"the {self.kind} grammar cannot go on: {_clip(self._matcher.get_error())}; "
                               "simplify the grammar")
        words = self._llg_bitmask[0, :self._num_words].view(np.uint32).tolist()
        words[-1] &= self._last_word_bits
        return words

    def accept(self, token: int) -> None:
        """Advance past `token`; raises GrammarError, leaving the matcher as it was, if the grammar does not allow it.

        Every token of allowed_bitmask() is taken, and a little more: where the grammar forces text
        (a required key, say), the mask holds only llguidance's canonical token for it, while accept
        also takes its other spellings ("n" + "ame" for "name").
        """
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise GrammarError(f"a token is an int, not {type(token).__name__}")
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise GrammarError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        if self._matcher.is_error():
            raise GrammarError(f"the {self.kind} grammar cannot go on: {_clip(self._matcher.get_error())}")
        stopped = self._matcher.is_stopped()
        allowed = token in self._stop_token_ids if stopped else self._matcher.validate_tokens([token]) == 1
        if not allowed:
            raise GrammarError(f"token {token} ({self._llg_tokenizer.dbg_tokens([token])}) is not allowed by the "
                               f"{self.kind} grammar here; pick the next token from allowed_bitmask()")
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the {self.kind} grammar failed on token {token}: {_clip(self._matcher.get_error())}; "
                               "simplify the grammar")
        self._recorded.append(not stopped)

    def is_finished(self) -> bool:
        """Whether the grammar accepted a stop token or nothing more can follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def num_accepted(self) -> int:
        """Tokens accepted since the start (or the last reset), net of rollbacks."""
        return len(self._recorded)

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens; GrammarError if fewer than `n` were accepted."""
        if not 0 <= n <= len(self._recorded):
            raise GrammarError(f"cannot roll back {n} tokens: {len(self._recorded)} were accepted")
        if n == 0:
            return
        num_recorded = sum(self._recorded[-n:])
        if num_recorded and not self._matcher.rollback(num_recorded):
            raise GrammarError(f"the {self.kind} grammar failed to roll back: {_clip(self._matcher.get_error())}")
        del self._recorded[-n:]

    def reset(self) -> None:
        """Back to the start of the grammar, as compiled."""
        if not self._matcher.reset():
            raise GrammarError(f"the {self.kind} grammar failed to reset: {_clip(self._matcher.get_error())}")
        self._recorded.clear()
