"""model: model info and the tokenizer."""
from __future__ import annotations

from cluster.runtime.imports._common import raw, sync
from cluster.runtime.session import InferletSession
from cluster.runtime.wit_values import Refused, record, tagged_err, tagged_ok


def imports(s: InferletSession) -> dict:
    info = s.services.info
    tokenizer = s.services.tokenizer

    def model_info():
        return record(name=info.name, vocab_size=info.vocab_size, page_size=info.page_size,
                      max_position=info.max_position, stop_tokens=list(info.stop_token_ids),
                      chat_template=tokenizer.spec.chat_template or "")

    def decode(tokens: list[int]):
        bad = [t for t in tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise Refused(f"token {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
        return tagged_ok(tokenizer.decode(tokens))

    def chat(messages, add_generation_prompt: bool):
        return tagged_ok(tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], add_generation_prompt))

    return {
        "list-models": raw(lambda: [info.name]),
        "info": raw(model_info),
        "encode": raw(tokenizer.encode),
        "decode": sync(decode, tagged_err),
        "vocabulary": raw(lambda: s.services.vocabulary()),
        "apply-chat-template": sync(chat, tagged_err),
    }
