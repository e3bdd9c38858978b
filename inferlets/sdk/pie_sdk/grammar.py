"""Constrained decoding: a grammar matcher that lives on the host."""
import json as _json

from wit_world.imports import grammar

from pie_sdk.runtime import unwrap


class Grammar:
    """A matcher for one grammar. Pass it to Context.generate(grammar=...) or drive it by hand."""

    def __init__(self, kind: str, source: str):
        self.handle = unwrap(grammar.compile, kind, source)

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        return cls("json-schema", schema if isinstance(schema, str) else _json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, source: str) -> "Grammar":
        return cls("lark", source)

    @classmethod
    def gbnf(cls, source: str) -> "Grammar":
        return cls("gbnf", source)

    def next_mask(self) -> list:
        return list(unwrap(grammar.next_mask, self.handle))

    def accept(self, token: int) -> None:
        unwrap(grammar.accept, self.handle, token)

    def rollback(self, count: int) -> None:
        unwrap(grammar.rollback, self.handle, count)

    def is_finished(self) -> bool:
        return unwrap(grammar.is_finished, self.handle)

    def release(self) -> None:
        grammar.release(self.handle)
