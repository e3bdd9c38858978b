"""model: model info and the tokenizer. Texts and token lists are checked against the
inferlet's Limits before any work; a long text is encoded off the scheduler thread."""
from __future__ import annotations

from cluster.pending import Pending
from cluster.runtime.imports._common import raw, sync, waiting
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused, record, tagged_err, tagged_ok

INLINE_ENCODE_BYTES = 16 << 10  # shorter texts are encoded at once, on the scheduler thread (microseconds)
MAX_CHAT_MESSAGES = 4096


def imports(s: InferletSession) -> dict:
    info = s.services.info
    tokenizer = s.services.tokenizer
    limits = s.limits

    def model_info():
        return record(name=info.name, vocab_size=info.vocab_size, page_size=info.page_size,
                      max_position=info.max_position, stop_tokens=list(info.stop_token_ids),
                      chat_template=tokenizer.spec.chat_template or "")

    def encode(text: str) -> Pending:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limits.max_text_bytes:
            raise Refused(f"text of {size} bytes exceeds the limit of {limits.max_text_bytes} (max_text_bytes)")
        if size <= INLINE_ENCODE_BYTES:
            return Pending.ready(tokenizer.encode(text))
        return s.services.offload(tokenizer.encode, text)

    def decode(tokens: list[int]):
        if len(tokens) > limits.max_decode_tokens:
            raise Refused(f"{len(tokens)} tokens to decode exceed the limit of {limits.max_decode_tokens} "
                          f"(max_decode_tokens)")
        bad = [t for t in tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise Refused(f"token {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
        return tagged_ok(tokenizer.decode(tokens))

    def chat(messages, add_generation_prompt: bool):
        if len(messages) > MAX_CHAT_MESSAGES:
            raise Refused(f"{len(messages)} chat messages exceed the limit of {MAX_CHAT_MESSAGES}")
        size = sum(len(role) + len(content) for role, content in messages)  # characters bound bytes / 4
        if size > limits.max_text_bytes:
            raise Refused(f"chat messages of {size} characters exceed the limit of {limits.max_text_bytes} "
                          f"(max_text_bytes)")
        return tagged_ok(tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], add_generation_prompt))

    return {
        "list-models": raw(lambda: [info.name]),
        "info": raw(model_info),
        "encode": waiting(s, encode),
        "decode": sync(decode, tagged_err),
        "vocabulary": raw(lambda: s.services.vocabulary()),
        "apply-chat-template": sync(chat, tagged_err),
    }
