"""A Context owns KV pages and a token history, and generates from it."""
from wit_world.imports import forward, kv, model

from pie_sdk.runtime import model_info, unwrap
from pie_sdk.samplers import greedy


class Context:
    """Tokens already in the KV cache (`tokens`) plus tokens waiting to be written (`pending`)."""

    def __init__(self):
        info = model_info()
        self.page_size = info.page_size
        self.stop_tokens = set(info.stop_tokens)
        self.pages: list[int] = []
        self.tokens: list[int] = []
        self.pending: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def free(self) -> None:
        """Give every page back; the context is empty afterwards."""
        if self.pages:
            unwrap(kv.free, self.pages)
        self.pages, self.tokens, self.pending = [], [], []

    def fill(self, text: str) -> None:
        self.fill_tokens(model.encode(text))

    def fill_tokens(self, tokens: list[int]) -> None:
        self.pending.extend(tokens)

    def fill_chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> None:
        """Append chat messages [(role, content)] rendered by the model's chat template."""
        self.fill(unwrap(model.apply_chat_template, messages, add_generation_prompt))

    def _reserve(self, kv_len: int) -> int:
        """Allocate pages for kv_len slots; return the last page's fill."""
        need = -(-kv_len // self.page_size) - len(self.pages)
        if need > 0:
            self.pages.extend(unwrap(kv.allocate, need))
        return kv_len - (len(self.pages) - 1) * self.page_size

    def step(self, sampler=None):
        """Write the pending tokens' KV and return the output at the last one."""
        if not self.pending:
            raise ValueError("nothing to run: fill the context first")
        start = len(self.tokens)
        last = self._reserve(start + len(self.pending))
        spec = forward.OutputSpec(len(self.pending) - 1, sampler or greedy(), None)
        handle = unwrap(forward.submit, forward.Pass(
            self.pending, list(range(start, start + len(self.pending))), self.pages, last, None, [spec]))
        out = unwrap(forward.wait, handle)[0]
        self.tokens.extend(self.pending)
        self.pending = []
        return out.value

    def generate_stream(self, max_tokens: int, sampler=None, stop_tokens=None):
        """Yield the text of each new token as it comes, until a stop token or max_tokens."""
        stops = self.stop_tokens if stop_tokens is None else set(stop_tokens)
        generated: list[int] = []
        printed = 0
        for _ in range(max_tokens):
            token = self.step(sampler)
            if token in stops:
                break
            generated.append(token)
            self.pending.append(token)
            text = unwrap(model.decode, generated)
            if not text.endswith("\ufffd"):
                yield text[printed:]
                printed = len(text)

    def generate(self, max_tokens: int, sampler=None, stop_tokens=None) -> str:
        return "".join(self.generate_stream(max_tokens, sampler, stop_tokens))
