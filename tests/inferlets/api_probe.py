"""A test inferlet: each mode exercises part of the API, or misbehaves on purpose.

Results go back to the client as JSON messages, so the test can check them against the
executor directly.
"""
import json

try:  # imported at build time, so the `socket` mode can try it if the guest's Python has it
    import socket
except ImportError:
    socket = None

from wit_world.imports import forward, kv, model, runtime

from pie_sdk import Context, arguments, instance_id, log, model_info, send
from pie_sdk import distribution, greedy, logprobs, sample
from pie_sdk.runtime import HostError, unwrap


def emit(**fields) -> None:
    send(json.dumps(fields))


def mode_runtime(args):
    info = model_info()
    log("probing the runtime")
    emit(args=arguments(), instance_id=instance_id(), now_ms=runtime.now_ms(), vocab_size=info.vocab_size,
         page_size=info.page_size, max_position=info.max_position, stop_tokens=list(info.stop_tokens),
         name=info.name)


def mode_tokenizer(args):
    ids = model.encode("Hello, world!")
    chat = unwrap(model.apply_chat_template, [("user", "Hi")], True)
    emit(ids=list(ids), text=unwrap(model.decode, ids), chat=chat)
    try:
        unwrap(model.decode, [10**9])
    except HostError as e:
        emit(decode_error=str(e))


def mode_generate(args):
    with Context() as ctx:
        ctx.fill_chat([("user", args[0])])
        emit(text=ctx.generate(int(args[1])), tokens=ctx.tokens, pages=len(ctx.pages))


def mode_samplers(args):
    """One pass, five outputs at the last position: greedy, seeded sample, distribution, logprobs, masked greedy."""
    tokens = model.encode(args[0])
    n = len(tokens)
    pages = unwrap(kv.allocate, -(-n // model_info().page_size))
    last = n - (len(pages) - 1) * model_info().page_size
    vocab = model_info().vocab_size
    banned = int(args[1])
    words = [0xFFFFFFFF] * (-(-vocab // 32))
    words[banned // 32] &= ~(1 << (banned % 32)) & 0xFFFFFFFF
    specs = [forward.OutputSpec(n - 1, greedy(), None, None),
             forward.OutputSpec(n - 1, sample(0.8, 40, 0.9, 0.0, 7), None, None),
             forward.OutputSpec(n - 1, distribution(5, 1.0), None, None),
             forward.OutputSpec(n - 1, logprobs([banned, 42]), None, None),
             forward.OutputSpec(n - 1, greedy(), words, None)]
    h = unwrap(forward.submit, forward.Pass(tokens, list(range(n)), pages, last, None, specs))
    outs = [o.value for o in unwrap(forward.wait, h)]
    emit(tokens=tokens, pages=pages, greedy=outs[0], sampled=outs[1], dist_ids=outs[2][0], dist_probs=outs[2][1],
         logprobs=outs[3], masked=outs[4])
    unwrap(kv.free, pages)


def mode_kv(args):
    """copy and mask between owned pages; using a page it does not own is refused."""
    a, b = unwrap(kv.allocate, 2)
    unwrap(kv.copy, a, b, 0, 0, 4)
    unwrap(kv.mask, b, [True] + [False] * (model_info().page_size - 1))
    errors = {}
    for name, call in {"copy_foreign": lambda: unwrap(kv.copy, a, 10**6, 0, 0, 1),
                       "free_foreign": lambda: unwrap(kv.free, [10**6]),
                       "double_free": lambda: (unwrap(kv.free, [a]), unwrap(kv.free, [a]))}.items():
        try:
            call()
        except HostError as e:
            errors[name] = str(e)
    emit(pages=[a, b], errors=errors)


def mode_masked_pass(args):
    """Two passes queued, then waited together; the second's run-length mask hides token 0."""
    tokens = model.encode(args[0])
    n = len(tokens)
    ps = model_info().page_size
    count = -(-n // ps)
    last = n - (count - 1) * ps
    plain_pages, masked_pages = unwrap(kv.allocate, count), unwrap(kv.allocate, count)
    spec = [forward.OutputSpec(n - 1, logprobs([0, 1, 2, 100]), None, None)]
    rows = [[1, n - 1]] + [[0, 1, i, n - 1 - i] for i in range(1, n)]  # row i: skip slot 0, attend 1..i
    h1 = unwrap(forward.submit, forward.Pass(tokens, list(range(n)), plain_pages, last, None, spec))
    h2 = unwrap(forward.submit, forward.Pass(tokens, list(range(n)), masked_pages, last, rows, spec))
    emit(tokens=tokens, plain=unwrap(forward.wait, h1)[0].value, masked=unwrap(forward.wait, h2)[0].value)
    try:
        unwrap(forward.wait, h1)
    except HostError as e:
        emit(rewait_error=str(e))
    try:
        unwrap(forward.submit, forward.Pass(tokens, list(range(n)), plain_pages, last, [[1]] * n, spec))
    except HostError as e:
        emit(bad_mask_error=str(e))


# --- misbehaviour -----------------------------------------------------------------------------
def mode_raise(args):
    def inner():
        raise ValueError("the inferlet's own failure")
    inner()


def mode_spin(args):
    while True:
        pass


def mode_memory_bomb(args):
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))


def mode_read_file(args):
    try:
        with open(args[0]) as f:
            emit(read=f.read(100))
    except OSError as e:
        emit(error=f"{type(e).__name__}: {e}")


def mode_socket(args):
    if socket is None:
        emit(error="the guest's Python has no socket module")
        return
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", int(args[0])))
        emit(connected=True)
        s.close()
    except Exception as e:
        emit(error=f"{type(e).__name__}: {e}")


def mode_flood(args):
    """One oversized message, then as many small ones as asked."""
    try:
        send("x" * int(args[0]))
    except HostError as e:
        emit(error=str(e))
    for i in range(int(args[1])):
        send(str(i))


def mode_hog_pages(args):
    held = []
    try:
        while True:
            held += unwrap(kv.allocate, 8)
    except HostError as e:
        emit(held=len(held), error=str(e))
    if args and args[0] == "keep":  # keep them, then end with an exception: the host must reclaim every page
        raise RuntimeError(f"ending while holding {len(held)} pages")


def main(args):
    globals()["mode_" + args[0]](args[1:])
