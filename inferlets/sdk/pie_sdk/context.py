"""A Context owns KV pages and a token history, and generates from it.

State: `pages` (the KV sequence, in order), `kv_len` (filled slots over them), `tokens`
(whose KV is written), `pending` (to be written by the next pass), `next_position`.
Positions are explicit, so dropping pages leaves later positions where they were.

Pages may be shared: fork() shares full pages between contexts, export()/import_() share
them between inferlets. Shared pages are never written: before writing into a shared
last page, a context copies it into a page of its own (copy on write).
"""
import json

from wit_world.imports import forward, kv, model

from pie_sdk.detokenize import IncrementalText, held_back
from pie_sdk.runtime import model_info, unwrap
from pie_sdk.samplers import distribution, greedy

# this inferlet's pages: how many contexts use each, and how many host references it holds
_uses = {}
_host_refs = {}
_readonly = set()  # exported or imported pages


def _hold(pages, new_host_refs=False):
    for p in pages:
        _uses[p] = _uses.get(p, 0) + 1
        if new_host_refs:
            _host_refs[p] = _host_refs.get(p, 0) + 1


def _release(pages):
    to_free = []
    for p in pages:
        _uses[p] -= 1
        if _uses[p] == 0:
            del _uses[p]
            to_free += [p] * _host_refs.pop(p, 1)
            _readonly.discard(p)
    if to_free:
        unwrap(kv.free, to_free)


def _allocate(n):
    pages = list(unwrap(kv.allocate, n))
    _hold(pages, new_host_refs=True)
    return pages


class Context:
    def __init__(self):
        info = model_info()
        self.page_size = info.page_size
        self.stop_tokens = set(info.stop_tokens)
        self.pages = []
        self.kv_len = 0
        self.next_position = 0
        self.tokens = []
        self.pending = []
        self._masks = {}  # page -> its slot mask, for pages with masked slots

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def free(self) -> None:
        """Give every page back (shared ones live on while others use them); the context is empty."""
        pages, self.pages = self.pages, []
        if pages:
            _release(pages)
        self.kv_len, self.next_position, self.tokens, self.pending, self._masks = 0, 0, [], [], {}

    # -- filling ---------------------------------------------------------------------------------
    def fill(self, text: str) -> None:
        self.fill_tokens(unwrap(model.encode, text))

    def fill_tokens(self, tokens) -> None:
        self.pending.extend(tokens)

    def fill_chat(self, messages, add_generation_prompt: bool = True, after=()) -> None:
        """Append chat messages [(role, content)] rendered by the model's chat template.

        `after`: messages this context already holds (filled with add_generation_prompt=False);
        only what the template renders after them is appended, so a conversation can be filled
        turn by turn (a system prompt once, then each user turn).
        """
        after = list(after)
        text = unwrap(model.apply_chat_template, after + list(messages), add_generation_prompt)
        if after:
            head = unwrap(model.apply_chat_template, after, False)
            if not text.startswith(head):
                raise ValueError("the chat template renders these messages differently after more follow; "
                                 "fill the whole conversation at once")
            text = text[len(head):]
        self.fill(text)

    # -- pages -----------------------------------------------------------------------------------
    def _own_page(self, index: int) -> int:
        """Make pages[index] this context's own (copy on write) and return it."""
        page = self.pages[index]
        if page in _readonly or _uses.get(page, 0) > 1:
            [fresh] = _allocate(1)
            filled = min(self.page_size, self.kv_len - index * self.page_size)
            if filled > 0:
                unwrap(kv.copy, page, fresh, 0, 0, filled)
            if page in self._masks:
                self._masks[fresh] = self._masks.pop(page)
            self.pages[index] = fresh
            _release([page])
            page = fresh
        return page

    def _reserve(self, count: int) -> int:
        """Room for `count` more slots; returns the last page's fill after them."""
        if self.kv_len % self.page_size:
            self._own_page(len(self.pages) - 1)
        new_len = self.kv_len + count
        need = -(-new_len // self.page_size) - len(self.pages)
        if need > 0:
            self.pages.extend(_allocate(need))
        return new_len - (len(self.pages) - 1) * self.page_size

    def _trim(self) -> None:
        """Release pages past kv_len (after a rollback)."""
        keep = -(-self.kv_len // self.page_size)
        extra, self.pages = self.pages[keep:], self.pages[:keep]
        if extra:
            _release(extra)

    def mask_slots(self, start: int, end: int, masked: bool = True) -> None:
        """Hide (or show again) KV slots [start, end) from every later pass of this context."""
        if not 0 <= start <= end <= self.kv_len:
            raise ValueError(f"slots [{start}, {end}) are outside the context's {self.kv_len}")
        ps = self.page_size
        for index in range(start // ps, -(-end // ps)):
            page = self._own_page(index)
            bits = self._masks.setdefault(page, [False] * ps)
            for slot in range(max(start, index * ps), min(end, (index + 1) * ps)):
                bits[slot - index * ps] = masked
            unwrap(kv.mask, page, bits)

    def drop(self, start: int, end: int) -> None:
        """Remove KV slots [start, end) from attention: whole pages inside the range are given
        back, the rest are masked. Token history and later positions are unchanged."""
        if not 0 <= start <= end <= self.kv_len:
            raise ValueError(f"slots [{start}, {end}) are outside the context's {self.kv_len}")
        ps = self.page_size
        first_whole, last_whole = -(-start // ps), min(end // ps, (self.kv_len - 1) // ps)  # keep the tail page
        if first_whole < last_whole:
            gone = self.pages[first_whole:last_whole]
            self.pages = self.pages[:first_whole] + self.pages[last_whole:]
            self.kv_len -= len(gone) * ps
            _release(gone)
            removed = (last_whole - first_whole) * ps
            self.mask_slots(start, first_whole * ps)
            self.mask_slots(first_whole * ps, end - removed)
        else:
            self.mask_slots(start, end)

    # -- running ---------------------------------------------------------------------------------
    def _submit(self, inputs, outputs, mask=None) -> int:
        last = self._reserve(len(inputs))
        positions = list(range(self.next_position, self.next_position + len(inputs)))
        handle = unwrap(forward.submit, forward.Pass(list(inputs), positions, self.pages, last, mask, outputs))
        self.kv_len += len(inputs)
        self.next_position += len(inputs)
        return handle

    def submit_step(self, sampler=None, allowed=None, grammar=None, logprob: bool = False,
                    top_logprobs: int = 0) -> int:
        """Queue the pass writing the pending tokens; returns its handle (see forward.wait).

        Its outputs: the sampled token (with `logprob`, the pair (token, its log-probability)),
        then with `top_logprobs` k > 0 the k most likely tokens and their probabilities."""
        if not self.pending:
            raise ValueError("nothing to run: fill the context first")
        last = len(self.pending) - 1
        specs = [forward.OutputSpec(last, sampler or greedy(), allowed, None if grammar is None else grammar.handle,
                                    logprob)]
        if top_logprobs:
            specs.append(forward.OutputSpec(last, distribution(top_logprobs), None, None, False))
        handle = self._submit(self.pending, specs)
        self.tokens.extend(self.pending)
        self.pending = []
        return handle

    def write(self, tokens, mask, top_k: int = 0):
        """Write `tokens`' KV now (after any pending tokens) under a custom attention mask: per
        token, run lengths over every slot once they are written (kv_len + len(tokens)),
        alternating attend and skip, starting with attend (drafters.runs_attending builds one;
        nothing keeps a row causal but the row itself). Later passes
        see these slots as usual. With top_k > 0, returns the k most likely next tokens after
        the last one, (ids, probabilities), as that token saw the context."""
        self.flush()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("nothing to write: no tokens")
        if len(mask) != len(tokens):
            raise ValueError(f"one mask row per token: {len(mask)} rows for {len(tokens)} tokens")
        length = self.kv_len + len(tokens)
        for i, runs in enumerate(mask):
            if sum(runs) != length:
                raise ValueError(f"token {i}'s mask row covers {sum(runs)} slots, not the {length} there will be")
        outputs = [forward.OutputSpec(len(tokens) - 1, distribution(top_k), None, None, False)] if top_k else []
        done = unwrap(forward.wait, self._submit(tokens, outputs, [list(r) for r in mask]))
        self.tokens.extend(tokens)
        return done[0].value if top_k else None

    def flush(self, keep: int = 0) -> None:
        """Write the pending tokens' KV now, with no output: all of them (e.g. before export), or
        all but the last `keep` (keep=1 before forking: each fork then samples its own next token)."""
        cut = max(0, len(self.pending) - keep)
        write, self.pending = self.pending[:cut], self.pending[cut:]
        if write:
            unwrap(forward.wait, self._submit(write, []))
            self.tokens.extend(write)

    def step(self, sampler=None, allowed=None, grammar=None):
        """Write the pending tokens' KV and return the output at the last one."""
        return unwrap(forward.wait, self.submit_step(sampler, allowed, grammar))[0].value

    def generate_stream(self, max_tokens: int, sampler=None, stop_tokens=None, stop_strings=(), grammar=None):
        """Yield text as it is generated, until a stop token, a stop string (not included),
        max_tokens, or the grammar is complete. The last token stays pending."""
        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        generated = IncrementalText(lambda tokens: unwrap(model.decode, tokens))
        printed = 0
        text = ""
        for _ in range(max_tokens):
            token = self.step(sampler, grammar=grammar)
            if grammar is not None:
                grammar.accept(token)
            if token in stops:
                break
            self.pending.append(token)
            text = generated.append(token)
            hit = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
            if hit >= 0:
                text = text[:hit]
                break
            if grammar is not None and grammar.is_finished():
                break
            safe = len(text) - held_back(text, stop_strings)
            if not text.endswith("\ufffd") and safe > printed:
                yield text[printed:safe]
                printed = safe
        if len(text) > printed:
            yield text[printed:]

    def generate(self, max_tokens: int, sampler=None, stop_tokens=None, stop_strings=(), grammar=None) -> str:
        return "".join(self.generate_stream(max_tokens, sampler, stop_tokens, stop_strings, grammar))

    # -- the prefix cache ------------------------------------------------------------------------
    def reuse_cached_prefix(self) -> int:
        """On an empty context filled with tokens not yet run: take the worker's cached KV for the
        longest run of whole pages of them (computed by an earlier inferlet of this program and
        tenant) instead of computing it; returns how many tokens that covers. At least one token
        stays pending, so the next step has an output."""
        if self.pages or self.kv_len:
            raise ValueError("reuse_cached_prefix needs an empty context (fill it, then call this first)")
        if len(self.pending) <= self.page_size:
            return 0
        pages, covered = unwrap(kv.cache_lookup, self.pending[:len(self.pending) - 1])
        if not pages:
            return 0
        self.pages = list(pages)
        _hold(self.pages, new_host_refs=True)
        _readonly.update(self.pages)
        self.tokens, self.pending = self.pending[:covered], self.pending[covered:]
        self.kv_len = self.next_position = covered
        return covered

    def cache_prefix(self) -> int:
        """Offer this context's whole pages to the worker's prefix cache, for later inferlets of this
        program and tenant that start with the same tokens; returns how many pages it took. Only
        a plain history qualifies (positions = slots, nothing masked or dropped); else 0."""
        full = self.kv_len // self.page_size
        if not full or self._masks or self.next_position != self.kv_len or len(self.tokens) != self.kv_len:
            return 0
        taken = unwrap(kv.cache_store, self.tokens[:full * self.page_size], self.pages[:full])
        _readonly.update(self.pages[:full])
        return taken

    # -- sharing ---------------------------------------------------------------------------------
    def fork(self) -> "Context":
        """A context with the same history: full pages shared, the partial last page copied."""
        child = Context()
        full = self.kv_len // self.page_size
        child.pages = self.pages[:full]
        _hold(child.pages)
        partial = self.kv_len - full * self.page_size
        if partial:
            [fresh] = _allocate(1)
            unwrap(kv.copy, self.pages[full], fresh, 0, 0, partial)
            child.pages.append(fresh)
        child.kv_len, child.next_position = self.kv_len, self.next_position
        child.tokens, child.pending = list(self.tokens), list(self.pending)
        child._masks = {p: list(b) for p, b in self._masks.items() if p in child.pages}
        return child

    def export(self, name: str, persistent: bool = False) -> None:
        """Share this context's KV under `name` (pending tokens are not part of it). A persistent
        export outlives this inferlet until someone unexports it."""
        meta = json.dumps({"sdk": 1, "tokens": self.tokens, "kv_len": self.kv_len,
                           "next_position": self.next_position})
        unwrap(kv.export_pages, name, self.pages, meta, persistent)
        _readonly.update(self.pages)

    @staticmethod
    def unexport(name: str) -> None:
        """Remove the export `name` (a persistent one may be removed by anyone); its pages are
        freed once no context holds them."""
        unwrap(kv.unexport, name)

    @classmethod
    def import_(cls, name: str) -> "Context":
        """A context continuing from the KV another context exported under `name`."""
        pages, meta = unwrap(kv.import_pages, name)
        ctx = cls()
        ctx.pages = list(pages)
        _hold(ctx.pages, new_host_refs=True)
        _readonly.update(ctx.pages)
        try:
            state = json.loads(meta)
            ctx.tokens, ctx.kv_len, ctx.next_position = state["tokens"], state["kv_len"], state["next_position"]
        except (ValueError, KeyError, TypeError):
            ctx.free()
            raise ValueError(f"{name!r} was not exported by a pie_sdk Context (its description is not ours)")
        return ctx

    # -- search ----------------------------------------------------------------------------------
    def beam_search(self, beam_width: int, max_tokens: int, stop_tokens=None) -> str:
        """The most likely continuation (sum of log-probabilities) kept among `beam_width` beams.
        Every beam's pass goes in one batched step. The context itself is unchanged."""
        import math

        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        beams = [(self.fork(), 0.0, [])]
        finished = []
        try:
            for _ in range(max_tokens):
                handles = [ctx.submit_step(distribution(beam_width)) for ctx, _, _ in beams]
                outputs = unwrap(forward.wait_all, handles)
                candidates = []
                for i, ((ctx, score, gen), outs) in enumerate(zip(beams, outputs)):
                    ids, probs = outs[0].value
                    candidates += [(score + math.log(max(p, 1e-30)), i, t, gen) for t, p in zip(ids, probs)]
                candidates.sort(key=lambda c: -c[0])
                grown = []
                for score, i, token, gen in candidates[:beam_width]:
                    if token in stops:
                        finished.append((score, gen))
                        continue
                    child = beams[i][0].fork()
                    child.pending = [token]
                    grown.append((child, score, gen + [token]))
                for ctx, _, _ in beams:
                    ctx.free()
                beams = grown
                best_done = max((s for s, _ in finished), default=-math.inf)
                if not beams or best_done >= max(s for _, s, _ in beams):
                    break  # scores only fall: no open beam can beat the best finished one
        finally:
            for ctx, _, _ in beams:
                ctx.free()
        score, tokens = max(finished + [(s, g) for _, s, g in beams], key=lambda c: c[0])
        return unwrap(model.decode, tokens)

    def generate_speculative(self, drafter, max_tokens: int, max_draft: int = 4, stop_tokens=None):
        """Greedy decoding that checks `drafter(history) -> guessed next tokens` in one pass per
        round: accepted guesses cost no extra step. Same tokens as greedy step-by-step decoding.
        A drafter with a `verified(outputs)` method is told the model's outputs past the first
        rejected guess (Jacobi decoding guesses those next). Returns (text, accepted_drafts, rounds)."""
        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        generated, accepted_total, rounds = [], 0, 0
        while len(generated) < max_tokens:
            if not self.pending:
                raise ValueError("nothing to run: fill the context first")
            draft = [int(t) for t in drafter(self.tokens + self.pending)][:max(0, min(max_draft,
                                                                                        max_tokens - len(generated) - 1))]
            inputs = self.pending + draft
            first = len(self.pending) - 1
            specs = [forward.OutputSpec(first + j, greedy(), None, None, False) for j in range(len(draft) + 1)]
            outs = [o.value for o in unwrap(forward.wait, self._submit(inputs, specs))]
            rounds += 1
            matched = 0
            while matched < len(draft) and draft[matched] == outs[matched]:
                matched += 1
            if hasattr(drafter, "verified"):
                drafter.verified(outs[matched + 1:])  # what the model said after the first wrong guess
            rejected = len(draft) - matched
            self.kv_len -= rejected
            self.next_position -= rejected
            self._trim()
            self.tokens.extend(self.pending + draft[:matched])
            accepted_total += matched
            new = draft[:matched] + [outs[matched]]
            self.pending = []
            for token in new:
                if token in stops or len(generated) >= max_tokens:
                    return unwrap(model.decode, generated), accepted_total, rounds
                generated.append(token)
            # the drafts are in the KV already; the correction token is not yet
            self.pending = [new[-1]]
        return unwrap(model.decode, generated), accepted_total, rounds
