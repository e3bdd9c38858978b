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


def arguments() -> list:
    return list(runtime.get_arguments())


def instance_id() -> str:
    return runtime.instance_id()


def send(message: str) -> None:
    """Send a message to the client (HostError if it is over the size limit)."""
    unwrap(runtime.send, message)


def receive(timeout_ms=None):
    """The next message from the client, or None when timeout_ms passes first."""
    return runtime.receive(timeout_ms)


def sleep(ms: int) -> None:
    runtime.sleep(int(ms))


def now_ms() -> int:
    return runtime.now_ms()


def log(message: str) -> None:
    runtime.log(message)


_info = None


def model_info():
    """name, vocab_size, page_size, max_position, stop_tokens, chat_template of the model."""
    global _info
    if _info is None:
        _info = model.info()
    return _info
