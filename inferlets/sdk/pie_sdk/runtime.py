"""Thin wrappers over the runtime and model imports."""
from wit_world.imports import model, runtime
from componentize_py_types import Err


class HostError(RuntimeError):
    """A host call refused: the message says why (quota, ownership, bad input)."""


def unwrap(call, *args):
    """Call an import returning result<T, string>; raise HostError on its error."""
    try:
        return call(*args)
    except Err as e:
        raise HostError(e.value) from None


def arguments() -> list[str]:
    return list(runtime.get_arguments())


def instance_id() -> str:
    return runtime.instance_id()


def send(message: str) -> None:
    unwrap(runtime.send, message)


def log(message: str) -> None:
    runtime.log(message)


_info = None


def model_info():
    """name, vocab_size, page_size, max_position, stop_tokens of the model."""
    global _info
    if _info is None:
        _info = model.info()
    return _info
