"""A test inferlet: each mode exercises part of the API, or misbehaves on purpose.

Results go back to the client as JSON messages, so the test can check them against the
executor directly.
"""
import json
import random

try:  # imported at build time, so the `socket` mode can try it if the guest's Python has it
    import socket
except ImportError:
    socket = None

from wit_world.imports import forward, grammar, kv, model, runtime

from pie_sdk import Context, Grammar, arguments, http, instance_id, log, messaging, model_info, ngram_drafter
from pie_sdk import distribution, greedy, logprobs, now_ms, receive, sample, send, sleep
from pie_sdk.runtime import HostError, unwrap


def emit(**fields) -> None:
    send(json.dumps(fields))


def mode_runtime(args):
    info = model_info()
    log("probing the runtime")
    vocab = model.vocabulary()
    emit(args=arguments(), instance_id=instance_id(), now_ms=runtime.now_ms(), vocab_size=info.vocab_size,
         page_size=info.page_size, max_position=info.max_position, stop_tokens=list(info.stop_tokens),
         name=info.name, models=list(model.list_models()), chat_template=info.chat_template,
         vocab_len=len(vocab), vocab_sample={str(i): vocab[i] for i in (0, 1, 100, len(vocab) - 1)})


def mode_receive(args):
    """Echo two client messages, time out on a third, and sleep."""
    send("ready")
    first, second = receive(), receive(10_000)
    none = receive(50)
    t0 = now_ms()
    sleep(120)
    emit(got=[first, second], timed_out=none is None, slept_ms=now_ms() - t0)


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
    specs = [forward.OutputSpec(n - 1, greedy(), None, None, False),
             forward.OutputSpec(n - 1, sample(0.8, 40, 0.9, 0.0, 7), None, None, False),
             forward.OutputSpec(n - 1, distribution(5, 1.0), None, None, False),
             forward.OutputSpec(n - 1, logprobs([banned, 42]), None, None, False),
             forward.OutputSpec(n - 1, greedy(), words, None, False)]
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
    spec = [forward.OutputSpec(n - 1, logprobs([0, 1, 2, 100]), None, None, False)]
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


def refusal(call, *args):
    try:
        call(*args)
    except HostError as e:
        return str(e)
    return None


def mode_oversized(args):
    """Each host call given sizes past its cap: the refusals, which must come before any work."""
    [page] = unwrap(kv.allocate, 1)
    huge = 1 << 30
    big_text = "word " * (2 << 20 >> 2)  # 2 MiB
    emit(last_page_len=refusal(unwrap, forward.submit, forward.Pass([1], [0], [page], huge, [[huge]], [])),
         mask_runs=refusal(unwrap, forward.submit, forward.Pass([1], [0], [page], 1, [[1] + [0] * 4096], [])),
         encode=refusal(unwrap, model.encode, big_text),
         decode=refusal(unwrap, model.decode, [0] * (1 << 19)),
         chat=refusal(unwrap, model.apply_chat_template, [("user", big_text)], True),
         grammar=refusal(Grammar.regex, "a" * (2 << 20)))
    unwrap(kv.free, [page])


def mode_huge_list(args):
    """A list longer than the host lifts (wasm_lists.MAX_ELEMENTS): the call ends this inferlet."""
    model.decode([0] * (1 << 21))


def mode_long_encode(args):
    """A text long enough to be encoded off the scheduler thread."""
    ids = unwrap(model.encode, args[0] * int(args[1]))
    emit(count=len(ids), head=list(ids[:8]), tail=list(ids[-8:]))


def mode_wait_all(args):
    """Three passes over three sequences waited together; then misuse of wait-all."""
    prompts = args
    ctxs = [Context() for _ in prompts]
    for c, p in zip(ctxs, prompts):
        c.fill(p)
    handles = [c.submit_step(logprobs([0, 5, 50])) for c in ctxs]
    outs = unwrap(forward.wait_all, handles)
    emit(logprobs=[o[0].value for o in outs])
    errors = {}
    for name, hs in {"unknown": [10**6], "twice": [handles[0], handles[0]]}.items():
        try:
            unwrap(forward.wait_all, hs)
        except HostError as e:
            errors[name] = str(e)
    emit(errors=errors)
    for c in ctxs:
        c.free()


def mode_fork(args):
    """Greedy text four ways from one written prompt: two forks, speculative, beam search (width 1 and 3)."""
    prompt, n = args[0], int(args[1])
    with Context() as base:
        base.fill_chat([("user", prompt)])
        first = base.step()  # the prompt's KV is written once; forks share its full pages
        base.fill_tokens([first])
        a, b = base.fork(), base.fork()
        shared = sum(1 for p in a.pages if p in b.pages)
        text_a, text_b = a.generate(n), b.generate(n)
        c = base.fork()
        spec_text, accepted, rounds = c.generate_speculative(ngram_drafter(2, 4), n)
        beam1, beam3 = base.beam_search(1, n), base.beam_search(3, n)
        for x in (a, b, c):
            x.free()
    emit(first=unwrap(model.decode, [first]), a=text_a, b=text_b, shared=shared, speculative=spec_text,
         accepted=accepted, rounds=rounds, beam1=beam1, beam3=beam3)


def mode_export(args):
    """exporter NAME PERSISTENT PROMPT: export the prompt's KV, then wait for the client's go.
    importer NAME CONTINUATION N [try-unexport]: continue from the import and generate."""
    role, name = args[0], args[1]
    if role == "exporter":
        ctx = Context()
        ctx.fill(args[3])
        ctx.step()
        ctx.pending = []
        ctx.export(name, persistent=args[2] == "1")
        send(json.dumps({"exported": kv.list_exports("")}))
        receive(60_000)
        errors = {}
        try:
            ctx.export(name)
        except HostError as e:
            errors["duplicate"] = str(e)
        emit(errors=errors)
        ctx.free()
        return
    ctx = Context.import_(name)
    imported = list(ctx.pages)
    errors = {}
    misuse = {"write": lambda: unwrap(kv.mask, imported[0], [True] * model_info().page_size),
              "copy_into": lambda: unwrap(kv.copy, imported[0], imported[0], 0, 0, 1),
              "unknown": lambda: Context.import_("no-such-export")}
    if args[4:] == ["try-unexport"]:
        misuse["unexport_foreign"] = lambda: unwrap(kv.unexport, name)
    for what, call in misuse.items():
        try:
            call()
        except (HostError, ValueError) as e:
            errors[what] = str(e)
    with Context() as plain:  # the same tokens, computed here instead of imported
        plain.fill_tokens(ctx.tokens)
        plain.fill(args[2])
        recomputed = plain.generate(int(args[3]))
    ctx.fill(args[2])
    text = ctx.generate(int(args[3]))
    emit(text=text, recomputed=recomputed, imported=imported, errors=errors)
    ctx.free()


def mode_unexport(args):
    unwrap(kv.unexport, args[0])
    emit(left=list(kv.list_exports("")))


def mode_drop(args):
    """Hide the second page of a prompt two ways, drop (free it) and mask; compare next-token logprobs."""
    probe = logprobs([0, 5, 50, 500])
    tokens = model.encode(args[0])
    results = {}
    for how in ("plain", "drop", "mask"):
        with Context() as ctx:
            ctx.fill_tokens(tokens[:-1])
            ctx.step()
            ctx.fill_tokens(tokens[-1:])
            ps = ctx.page_size
            pages_before = len(ctx.pages)
            if how == "drop":
                ctx.drop(ps, 2 * ps)
            elif how == "mask":
                ctx.mask_slots(ps, 2 * ps)
            results[how] = {"logprobs": ctx.step(probe), "pages": len(ctx.pages), "pages_before": pages_before}
    emit(tokens=tokens, **results)


def mode_grammar(args):
    """Generate JSON under a schema, then text under a regex; report bad grammars."""
    schema = json.loads(args[0])
    with Context() as ctx:
        ctx.fill_chat([("user", args[1])])
        g = Grammar.json_schema(schema)
        text = ctx.generate(96, grammar=g)
        finished = g.is_finished()
        g.release()
    with Context() as ctx:
        ctx.fill("My favourite number is")
        digits = ctx.generate(16, grammar=Grammar.regex(" [0-9]{3}"))
    errors = {}
    for what, call in {"bad_regex": lambda: Grammar.regex("("), "bad_kind": lambda: Grammar("yaml", "x"),
                       "released": lambda: g.next_mask()}.items():
        try:
            call()
        except HostError as e:
            errors[what] = str(e)
    emit(text=text, finished=finished, digits=digits, errors=errors)


def mode_stop_strings(args):
    with Context() as ctx:
        ctx.fill_chat([("user", args[0])])
        emit(text=ctx.generate(40, stop_strings=[args[1]]))


def mode_subscriber(args):
    """Subscribe, wait for a broadcast, pull a queue message, read the store."""
    topic, queue = args[0], args[1]
    messaging.subscribe(topic)
    send("subscribed")
    got = messaging.next_broadcast(topic, 30_000)
    pulled = messaging.pull(queue, 30_000)
    timed_out = messaging.pull(queue, 50)
    emit(broadcast=got, pulled=pulled, timed_out=timed_out, stored=messaging.store_get("shared-key"),
         keys=messaging.store_keys("shared"))


def mode_publisher(args):
    topic, queue = args[0], args[1]
    messaging.store_set("shared-key", "shared-value")
    reached = messaging.broadcast(topic, "hello subscribers")
    messaging.push(queue, "work item")
    errors = {}
    try:
        messaging.next_broadcast("never-subscribed", 10)
    except HostError as e:
        errors["not_subscribed"] = str(e)
    try:
        messaging.push(queue, "x" * 200_000)
    except HostError as e:
        errors["oversized"] = str(e)
    emit(reached=reached, deleted=messaging.store_delete("no-such-key"), errors=errors)


def mode_http(args):
    """GET and POST an allowed URL; try a host the deployment does not allow."""
    allowed, disallowed = args[0], args[1]
    r = http.get(allowed + "/hello")
    p = http.post(allowed + "/echo", "ping", headers=[("X-Test", "1")])
    errors = {}
    try:
        http.get(disallowed)
    except HostError as e:
        errors["disallowed"] = str(e)
    try:
        http.get(allowed + "/slow", timeout_ms=200)
    except HostError as e:
        errors["timeout"] = str(e)
    emit(get_status=r.status, get_body=r.text, post_status=p.status, post_body=p.text, errors=errors)


# --- misbehaviour -----------------------------------------------------------------------------
def mode_raise(args):
    def inner():
        raise ValueError("the inferlet's own failure")
    inner()


def mode_wrong_type(args):
    """None where the WIT has a sampler variant: the bindings trap while lowering it."""
    forward.submit(forward.Pass([1], [0], unwrap(kv.allocate, 1), 1, None, [forward.OutputSpec(0, None, None, None, False)]))


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


def mode_fuzz_imports(args):
    """Call imports with random arguments (seeded), edge values among them: each must answer or
    refuse; none may trap the guest or harm the host. Reports how many answered and refused."""
    rng = random.Random(int(args[0]))
    edges = [0, 1, 2, 15, 16, 17, 255, 4096, 65535, 2**31 - 1, 2**32 - 1]
    mine, handles = [], []

    def num():
        return rng.choice(edges) if rng.random() < 0.5 else rng.randrange(64)

    def nums():
        return [num() for _ in range(rng.choice([0, 1, 2, 3, 17, 300]))]

    def text():
        return rng.choice(["", "a", "h\u00e9llo <|im_end|>", "x" * 5000, "[", "{\"type\": \"object\"}"])

    def page():
        return rng.choice(mine) if mine and rng.random() < 0.7 else num()

    def spec():
        sampler = rng.choice([greedy(), distribution(max(1, num())), logprobs(nums()), sample(rng.random() + 0.01)])
        return forward.OutputSpec(num(), sampler, rng.choice([None, nums()]), rng.choice([None, num()]),
                                  rng.random() < 0.5)

    def submit():
        tokens = nums() or [1]
        mask = rng.choice([None, [nums() for _ in range(rng.choice([0, 1, len(tokens)]))]])
        passed = forward.Pass(tokens, rng.choice([nums(), list(range(len(tokens)))]),
                              [page() for _ in range(rng.choice([0, 1, 2]))], num(), mask,
                              [spec() for _ in range(rng.choice([0, 1, 2]))])
        handles.append(unwrap(forward.submit, passed))

    calls = {
        "allocate": lambda: mine.extend(unwrap(kv.allocate, rng.choice([0, 1, 2, 300, 2**32 - 1]))),
        "free": lambda: unwrap(kv.free, [page() for _ in range(rng.choice([0, 1, 2]))]),
        "copy": lambda: unwrap(kv.copy, page(), page(), num(), num(), num()),
        "mask": lambda: unwrap(kv.mask, page(), [rng.random() < 0.5 for _ in range(rng.choice([0, 1, 16, 17, 300]))]),
        "cache-lookup": lambda: unwrap(kv.cache_lookup, nums()),
        "submit": submit,
        "wait": lambda: unwrap(forward.wait, handles.pop() if handles and rng.random() < 0.7 else num()),
        "wait-all": lambda: unwrap(forward.wait_all, [num() for _ in range(rng.choice([0, 1, 2]))]),
        "decode": lambda: unwrap(model.decode, nums()),
        "encode": lambda: unwrap(model.encode, text()),
        "chat": lambda: unwrap(model.apply_chat_template, [(text()[:50], text())], rng.random() < 0.5),
        "grammar": lambda: unwrap(grammar.compile, rng.choice(["regex", "json_schema", "lark", "nonsense"]), text()[:300]),
        "next-mask": lambda: unwrap(grammar.next_mask, num()),
        "broadcast": lambda: unwrap(messaging.broadcast, text()[:64], text()),
        "pull": lambda: unwrap(messaging.pull, text()[:64], rng.choice([0, 1, 5])),
        "store": lambda: unwrap(messaging.store_set, text()[:64], text()),
        "send": lambda: send(text()),
    }
    counts = {"answered": 0, "refused": 0, "unrepresentable": 0}
    names = sorted(calls)
    for _ in range(int(args[1])):
        try:
            calls[rng.choice(names)]()
            counts["answered"] += 1
        except HostError:
            counts["refused"] += 1
        except (ValueError, TypeError, OverflowError, IndexError):  # the guest's bindings would not lower it
            counts["unrepresentable"] += 1
    emit(**counts)


def mode_flood_big(args):
    """Many large messages, numbered, as fast as send takes them."""
    filler = "y" * int(args[1])
    for i in range(int(args[0])):
        send(f"{i}:{filler}")


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
