"""The model's tokenizer (Hugging Face `tokenizers`), its chat template, and its stop tokens."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """What the weight cache stores next to the weights to rebuild a Tokenizer."""

    tokenizer_json: str  # the `tokenizers` serialization
    chat_template: str | None  # a Jinja2 template over `messages`
    bos_token: str | None
    eos_token: str | None
    stop_token_ids: tuple[int, ...] = field(default=())  # generation ends at any of these

    def to_json(self) -> str:
        return json.dumps({"chat_template": self.chat_template, "bos_token": self.bos_token,
                           "eos_token": self.eos_token, "stop_token_ids": list(self.stop_token_ids)})

    @classmethod
    def from_json(cls, meta: str, tokenizer_json: str) -> TokenizerSpec:
        d = json.loads(meta)
        return cls(tokenizer_json=tokenizer_json, chat_template=d["chat_template"], bos_token=d["bos_token"],
                   eos_token=d["eos_token"], stop_token_ids=tuple(d["stop_token_ids"]))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._tok = HFTokenizer.from_str(spec.tokenizer_json)
        self._template = None
        if spec.chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(spec.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.spec.stop_token_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. <|im_start|>) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def vocabulary(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; format the prompt yourself")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.spec.bos_token or "", eos_token=self.spec.eos_token or "")
