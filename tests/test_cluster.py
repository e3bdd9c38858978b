"""Cluster mode on a real local Ray cluster: two CPU workers with the real model, two inferlet hosts,
the directory, and the gateway's client API over loopback gRPC.

One cluster serves the whole module (starting it costs ~15 s: Ray, then two model loads). The
fault tests kill actors: they run last in this module, and each waits for Ray to bring the
killed actor back before it ends, so the next test finds a whole cluster again.
"""
import json
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.actors.cluster import Cluster, ClusterSpec, init_local_ray, start_cluster  # noqa: E402
from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE  # noqa: E402
from cluster.actors.worker_actor import WorkerActor  # noqa: E402
from cluster.actors.cluster_host import ClusterHost  # noqa: E402
from cluster.api.grpc_client import Failed, Finished, Message, PieClient, RequestFailed, Started  # noqa: E402
from cluster.api.grpc_server import serve_service, status_of  # noqa: E402
import grpc  # noqa: E402
from cluster.runtime.inferlet_build import build  # noqa: E402
from cluster.errors import DirectoryUnavailable, InferletError, UnknownOwner  # noqa: E402
from cluster.pending import Pending  # noqa: E402
from helpers import wait_until  # noqa: E402
from workers.errors import ModelLoadError  # noqa: E402

TEXT = "inferlets/examples/text_completion.py"
PREFIX = "inferlets/examples/prefix_cache.py"
NUM_PAGES = 96  # per worker
SYSTEM = "You are a terse geography tutor. Answer in one sentence."


@pytest.fixture(scope="module")
def cluster():
    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        # fp32: in bf16 a batched step can flip the first token of a near tie ("L'Etoile" instead of "The capital")
        spec = ClusterSpec(workers=2, hosts=2, num_pages=NUM_PAGES, torch_threads=1, bind_address="127.0.0.1",
                           dtype="fp32")
        c = start_cluster(spec)
        server = serve_service(c.gateway_service(), port=0)
        c.target = server.target
        yield c
        server.stop(0)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with PieClient(cluster.target) as c:
        yield c


@pytest.fixture(scope="module")
def programs(client):
    return {path: client.upload(build(path)) for path in (TEXT, PREFIX)}


@pytest.fixture(scope="module")
def local_host(cluster):
    """A ClusterHost in this process (same directory, same workers): launches it can pin to a worker."""
    with ClusterHost(cluster.directory) as host:
        yield host


def answers(method):
    """What an actor method returns, or None while the actor is down or restarting."""
    try:
        return ray.get(method.remote(), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):
        return None


def new_steps(cluster) -> list[int]:
    """Batched steps each worker ran since the last call (drained: the batchers keep only the last 1024)."""
    return [len(ray.get(w.steps.remote(drain=True))) for w in cluster.workers]


def settled(cluster) -> None:
    """Every worker has all its pages back (and its books agree), and the directory agrees with itself."""
    def all_free():
        free = ray.get([w.free_pages.remote() for w in cluster.workers])
        return all(f == NUM_PAGES for f in free)
    wait_until(all_free, 30, "every worker's KV pages to come back")
    ray.get([w.check_idle.remote() for w in cluster.workers])
    cluster.directory.check_invariants()
    assert all(w.running == 0 for w in cluster.directory.workers())


def collect(stream) -> tuple[str, list[str], object]:
    """(instance id, messages, final event) of a Launch stream."""
    instance_id, messages, last = None, [], None
    for event in stream:
        if isinstance(event, Started):
            instance_id = event.instance_id
        elif isinstance(event, Message):
            messages.append(event.text)
        else:
            last = event
    return instance_id, messages, last


def test_many_inferlets_spread_over_both_workers_and_hosts(cluster, client, programs):
    new_steps(cluster)
    prompts = ["What is the capital of France?", "Name a color.", "Count to three.", "Say hello.",
               "What is 2 + 2?", "Name a fruit."]
    results = [None] * len(prompts)

    def run(i):
        results[i] = collect(client.launch(programs[TEXT], ["--prompt", prompts[i], "--max-tokens", "8"]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(isinstance(r[2], Finished) for r in results), [r[2] for r in results]
    assert "Paris" in "".join(results[0][1])
    hosts = {r[0].rsplit("-", 1)[0] for r in results}
    assert len(hosts) == 2, f"every inferlet ran on one host: {hosts}"
    ran = new_steps(cluster)
    assert all(ran), f"a worker ran no step: {ran}"
    settled(cluster)


def test_a_guest_trap_in_a_host_actor_fails_that_inferlet_only(cluster, client, programs):
    """wasmtime reports a trap through signal handlers; the host actor's process (where Ray installed its
    own crash handlers first) must survive it and serve the next inferlet."""
    probe = client.upload(build("tests/inferlets/api_probe.py"))
    _, _, last = collect(client.launch(probe, ["wrong_type"]))
    assert isinstance(last, Failed) and "does not match the import's WIT type" in last.error
    _, messages, last = collect(client.launch(programs[TEXT], ["--max-tokens", "4"]))
    assert isinstance(last, Finished) and messages
    settled(cluster)


def message_across_hosts(cluster, topic: str, queue: str) -> None:
    """Subscriber on host 0, publisher on host 1 (each launched at its host directly): the broadcast, the
    queue message and the store all cross hosts, through the cluster's one bus."""
    probe = build("tests/inferlets/api_probe.py")
    targets = [ray.get(h.address.remote())[1] for h in cluster.hosts]
    token = cluster.internal_token  # a host serves only the cluster's own callers
    with PieClient(targets[0], token=token) as first, PieClient(targets[1], token=token) as second:
        events = iter(first.launch(first.upload(probe), ["subscriber", topic, queue]))
        assert isinstance(next(events), Started)
        assert next(events).text == "subscribed"
        _, [sent], last = collect(second.launch(second.upload(probe), ["publisher", topic, queue]))
        assert isinstance(last, Finished), last
        _, [got], last = collect(events)
        assert isinstance(last, Finished), last
    assert json.loads(sent)["reached"] == 1
    assert json.loads(got) == {"broadcast": "hello subscribers", "pulled": "work item", "timed_out": None,
                               "stored": "shared-value", "keys": ["shared-key"]}


def test_inferlets_on_different_hosts_message_each_other_through_the_clusters_bus(cluster):
    message_across_hosts(cluster, "cluster-news", "cluster-jobs")


def test_the_clusters_own_services_refuse_callers_without_its_token(cluster):
    """Workers, hosts and the bus listen on the nodes' addresses: without the cluster's internal token a
    caller reads no pages, launches nothing and hears no messages."""
    from cluster.rpc.bus_service import BusUnavailable, RemoteBus
    from cluster.rpc.remote_worker import RemoteWorker, WorkerUnavailable

    token = cluster.internal_token
    assert token and len(token) >= 24
    worker_target = cluster.directory.target("worker-0")
    with pytest.raises(WorkerUnavailable, match="UNAUTHENTICATED"):
        RemoteWorker(worker_target, timeout_s=30)
    with pytest.raises(WorkerUnavailable, match="UNAUTHENTICATED.*wrong"):
        RemoteWorker(worker_target, timeout_s=30, token="not-the-token")
    RemoteWorker(worker_target, timeout_s=30, token=token).close()  # the right one is served
    host_target = ray.get(cluster.hosts[0].address.remote())[1]
    with PieClient(host_target) as stranger, pytest.raises(RequestFailed, match="UNAUTHENTICATED"):
        stranger.list()
    with PieClient(host_target, token=token) as member:
        assert member.list() is not None
    bus = RemoteBus(cluster.directory.bus_target, timeout_s=30)
    with pytest.raises(BusUnavailable, match="UNAUTHENTICATED"):
        bus.store_keys()
    bus.close()


def test_the_openai_api_through_the_gateway(cluster, client):
    """The OpenAI API over cluster mode's gateway: the built-in inferlet runs on a host actor."""
    import openai

    from cluster.api.openai_http import serve_openai

    http = serve_openai(cluster.gateway_service(), port=0)
    try:
        api = openai.OpenAI(base_url=http.url, api_key="k", max_retries=0, timeout=180)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = api.chat.completions.create(model=api.models.list().data[0].id, messages=question, max_tokens=16,
                                            temperature=0)
        assert "Paris" in reply.choices[0].message.content and reply.usage.completion_tokens > 3
        streamed = api.chat.completions.create(model=reply.model, messages=question, max_tokens=16, temperature=0,
                                               stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    finally:
        http.stop()
    wait_until(lambda: client.health().running == 0, 30)
    assert ray.get([w.reset_prefix_cache.remote() for w in cluster.workers]) == [0, 0]
    settled(cluster)  # every page back once the cache lets go of its own


def test_metrics_and_status_gather_every_actor_onto_the_gateways_port(cluster, client, programs):
    """/metrics in cluster mode: the gateway's own series and each worker's and host's, labelled by
    actor (gathered from the actors by the gateway); /status.json: both workers, with their steps."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.api.openai_http import serve_openai

    _, _, last = collect(client.launch(programs[TEXT], ["--prompt", "Hi", "--max-tokens", "4"]))
    assert isinstance(last, Finished)
    http = serve_openai(cluster.gateway_service(), port=0)
    try:
        base = http.url.removesuffix("/v1")
        text = requests.get(f"{base}/metrics", timeout=30).text
        status = requests.get(f"{base}/status.json", timeout=30).json()
    finally:
        http.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kv = {(s.labels["actor"], s.labels["state"]): s.value for s in families["pie_kv_pages"].samples}
    assert kv[("worker-0", "total")] == kv[("worker-1", "total")] == NUM_PAGES
    actors = {s.labels["actor"] for f in families.values() for s in f.samples}
    assert actors == {"gateway", "worker-0", "worker-1", "host-0", "host-1"}, actors
    steps = {s.labels["actor"]: s.value for s in families["pie_step_seconds"].samples if s.name.endswith("_count")}
    assert steps["worker-0"] + steps["worker-1"] > 0  # (the gateway's are this test process's: other tests' steps)
    hosts_launched = sum(s.value for s in families["pie_inferlets_launched"].samples
                         if s.labels["actor"].startswith("host-"))
    assert hosts_launched >= 1  # the launch above ran on a host actor
    assert {w["id"] for w in status["workers"]} == {"worker-0", "worker-1"}
    assert all(w["live"] and w["pages"]["total"] == NUM_PAGES for w in status["workers"])
    assert any(w["steps"] for w in status["workers"])


def _run_through(service, program: str, prompt: str = "Hi", max_tokens: int = 2):
    """Launch through a GatewayService in process; its Outcome."""
    from cluster.runtime.outbox import Outbox

    events = Outbox(256, 1 << 22)
    service.start(program, ["--prompt", prompt, "--max-tokens", str(max_tokens)], events)
    while isinstance(item := events.get(timeout=120), str):
        pass
    return item


def test_a_host_that_is_gone_gets_the_launch_sent_elsewhere_and_is_dropped(cluster):
    """A host still in the directory's table whose port is closed (a fault injected on purpose: how a
    host killed a moment ago looks, before its reports stop): the launch picked for it goes to a live
    host, and the dead one leaves the table. With no live host left, the launch is refused as
    UNAVAILABLE, saying why."""
    service = cluster.gateway_service()
    program = service.add_program(build(TEXT).read_bytes())
    ghost = "0-ghost"  # sorts first: picked first among equally loaded hosts
    cluster.directory.host_alive(ghost, "127.0.0.1:9", 100)
    outcome = _run_through(service, program)
    assert outcome.ok, outcome.error  # it ran on a live host
    assert ghost not in [h.host_id for h in cluster.directory.hosts()]
    live = [h.host_id for h in cluster.directory.hosts()]
    try:
        for host_id in live:
            cluster.directory.set_host_draining(host_id)
        cluster.directory.host_alive(ghost, "127.0.0.1:9", 100)
        with pytest.raises(InferletError) as refused:
            _run_through(service, program)
        assert "none of the 2 inferlet hosts takes inferlets now" in str(refused.value), refused.value
        assert status_of(refused.value) == grpc.StatusCode.UNAVAILABLE
        assert ghost not in [h.host_id for h in cluster.directory.hosts()]
    finally:
        for host_id in live:
            cluster.directory.set_host_draining(host_id, False)
    assert all(h.picked == 0 for h in cluster.directory.hosts()), cluster.directory.hosts()


@pytest.fixture
def second_gateway(cluster, tmp_path):
    """Another gateway over the same cluster, with a program store of its own (empty): what a second
    Serve replica is."""
    from cluster.api.program_store import ProgramStore

    server = serve_service(cluster.gateway_service(ProgramStore(tmp_path / "programs")), port=0)
    with PieClient(server.target) as client:
        yield client
    server.stop(0)


def test_a_second_gateway_serves_the_first_ones_inferlets_and_programs(cluster, client, programs, second_gateway):
    """Launched through one gateway; listed, sent to and terminated through another, which also launches
    a program only the first was sent (it fetches it from the directory)."""
    instance_id, events = _first_message(_long(client, programs))
    listed = {i.instance_id: i for i in second_gateway.list()}
    assert instance_id in listed and listed[instance_id].program_id == programs[TEXT]
    second_gateway.send(instance_id, "a message it never reads")
    second_gateway.terminate(instance_id)
    last = [e for e in events if not isinstance(e, Message)][-1]
    assert isinstance(last, Failed) and "terminated by its client" in last.error, last
    with pytest.raises(RequestFailed) as ended:
        second_gateway.send(instance_id, "late")
    assert ended.value.code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in ended.value.details
    assert instance_id not in [i.instance_id for i in client.list()]
    _, messages, last = collect(second_gateway.launch(programs[TEXT], ["--prompt", "What is the capital of France?",
                                                                     "--max-tokens", "8"]))
    assert isinstance(last, Finished) and "Paris" in "".join(messages), last
    settled(cluster)


def test_attach_through_another_gateway_takes_over_the_stream_from_where_the_client_left_off(
        cluster, client, programs, second_gateway):
    """The client read a few events through one gateway; an Attach through the other from the next seq
    gets every later event once, then the end; the first stream ends saying another client attached.
    The owner token is checked, and a seq the replay buffer does not hold is refused saying what it holds."""
    stream = client.launch(programs[TEXT], ["--prompt", "Count from one to thirty.", "--max-tokens", "40",
                                            "--ignore-eos"])
    events = stream.events_pb()
    seen = [next(events) for _ in range(4)]  # started, three messages
    assert [e.seq for e in seen] == [0, 1, 2, 3] and stream.owner_token
    with pytest.raises(RequestFailed) as denied:
        list(second_gateway.attach(stream.instance_id, "not-the-token", 4))
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(RequestFailed) as ahead:
        list(second_gateway.attach(stream.instance_id, stream.owner_token, 10_000))
    assert ahead.value.code == grpc.StatusCode.OUT_OF_RANGE and "never sent" in ahead.value.details
    resumed = second_gateway.resume(stream)
    rest = list(resumed.events_pb())
    assert [e.seq for e in rest] == list(range(4, 4 + len(rest))), "events lost or repeated"
    assert rest[-1].WhichOneof("kind") == "finished" and rest[-1].seq == 40 + 1, rest[-1]  # 40 messages, then the end
    old = [e for e in events if e.WhichOneof("kind") != "message"]
    assert old and old[-1].WhichOneof("kind") == "failed" and "another client attached" in old[-1].failed.error
    # ended: its events stay attachable a while, from any seq still held
    again = list(second_gateway.attach(stream.instance_id, stream.owner_token, 40).events_pb())
    assert [e.seq for e in again] == [40, 41] and again[-1].WhichOneof("kind") == "finished"
    settled(cluster)


def test_health_sums_both_workers(client):
    health = client.health()
    assert health.total_pages == 2 * NUM_PAGES and health.model.startswith("SmolLM2")


def _answer(host, worker_id: str, *extra) -> tuple[str, str]:
    outcome = host.run(PREFIX, ["--system", SYSTEM, "--max-tokens", "12", *extra], worker_id=worker_id)
    assert outcome.ok, outcome.error
    return outcome.messages[0], "".join(outcome.messages[1:])


def test_export_on_one_worker_import_on_the_other_copies_the_pages(cluster, local_host):
    status0, first = _answer(local_host, "worker-0")
    assert status0 == "cache miss"
    [name] = cluster.directory.list_exports("prefix-cache/")
    assert cluster.directory.lookup(name).worker_id == "worker-0"
    status1, copied = _answer(local_host, "worker-1")  # the pages come across from worker-0
    status2, in_place = _answer(local_host, "worker-0")
    assert (status1, status2) == ("cache hit", "cache hit")
    assert copied == first == in_place, "the copied KV gives another greedy answer than the original"
    assert cluster.directory.lookup(name).num_imports == 2
    assert cluster.directory.copies_in_flight() == []
    _answer_unexport = local_host.run(PREFIX, ["--system", SYSTEM, "--unexport"], worker_id="worker-1")
    assert _answer_unexport.ok, _answer_unexport.error  # unexported from another worker than its own
    assert cluster.directory.list_exports("prefix-cache/") == []
    settled(cluster)


def test_a_copy_across_workers_does_not_stall_the_hosts_other_inferlets(cluster, local_host, monkeypatch):
    """While an import's pages come across from another worker (each read held back 3 s here, a fault
    injected on purpose), a text completion on the importer's host and worker runs to its end."""
    status, _ = _answer(local_host, "worker-0")  # exports the prefix on worker-0
    assert status == "cache miss"
    local_host.component(TEXT)  # built and compiled before the clock starts
    source = local_host.connection("worker-0")
    read = source.read_pages

    def slow_read(holder, pages):
        late = Pending()
        read(holder, pages).on_done(lambda r: threading.Timer(
            3.0, lambda: late.fail(r.error) if r.error else late.complete(r.value)).start())
        return late

    monkeypatch.setattr(source, "read_pages", slow_read)
    ended = {}
    importer = local_host.launch(PREFIX, ["--system", SYSTEM, "--max-tokens", "4"], worker_id="worker-1",
                                 on_message=lambda m: ended.setdefault("import answered", time.monotonic()))
    other = local_host.launch(TEXT, ["--max-tokens", "6", "--ignore-eos"], worker_id="worker-1",
                              on_message=lambda m: ended.__setitem__("other's last text", time.monotonic()))
    assert other.wait(120).ok and importer.wait(120).ok
    assert importer.outcome.messages[0] == "cache hit"
    assert ended["other's last text"] < ended["import answered"], "the other inferlet waited for the copy"
    monkeypatch.undo()
    assert local_host.run(PREFIX, ["--system", SYSTEM, "--unexport"], worker_id="worker-0").ok
    assert cluster.directory.copies_in_flight() == []
    settled(cluster)


def test_an_importer_stopped_mid_copy_leaves_no_pages_behind(cluster, local_host, monkeypatch):
    """Stopped while its copy is under way (the copy's first call held back 3 s, on purpose): the importer
    ends at once, and once the copy has ended (its lease went with the importer) every page is back."""
    _answer(local_host, "worker-0")
    source = local_host.connection("worker-0")
    lease_import = source.import_
    monkeypatch.setattr(source, "import_", lambda *args: (time.sleep(3.0), lease_import(*args))[1])
    doomed = local_host.launch(PREFIX, ["--system", SYSTEM, "--max-tokens", "4"], worker_id="worker-1")
    wait_until(lambda: cluster.directory.copies_in_flight(), 30, "the copy to start")
    doomed.stop("stopped mid-copy")
    assert not doomed.wait(60).ok
    wait_until(lambda: not cluster.directory.copies_in_flight(), 30, "the copy to end")
    monkeypatch.undo()
    assert local_host.run(PREFIX, ["--system", SYSTEM, "--unexport"], worker_id="worker-0").ok
    settled(cluster)  # had the late pages stayed with the ended importer, worker-1 would miss them


def test_prefix_affinity_places_on_the_worker_holding_the_prefix(cluster, local_host, client, programs):
    status, _ = _answer(local_host, "worker-1")  # the system prompt's KV now lives on worker-1
    assert status == "cache miss"
    tokenizer = local_host.host_for("worker-1").worker.tokenizer
    hint = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], False)
    for _ in range(2):
        new_steps(cluster)
        _, messages, last = collect(client.launch(programs[PREFIX], ["--system", SYSTEM, "--max-tokens", "4"],
                                                  prompt_hint=hint))
        assert isinstance(last, Finished) and messages[0] == "cache hit"
        ran = new_steps(cluster)
        assert ran[0] == 0 and ran[1] > 0, f"not placed on worker-1: steps run {ran}"
    assert local_host.run(PREFIX, ["--system", SYSTEM, "--unexport"]).ok
    settled(cluster)


def test_a_worker_that_cannot_load_its_model_says_why_and_is_not_restarted(cluster):
    """A ModelLoadError is not a crash: the actor stays up (Ray would restart it forever), does not join,
    and the cluster's wait for workers ends at once with the worker's reason."""
    bad = ray.remote(WorkerActor).options(name="pie-worker-bad-model", namespace=NAMESPACE, max_restarts=-1,
                                          num_cpus=0).remote("worker-bad", DIRECTORY_NAME, "/nonexistent/model.gguf")
    try:
        reason = ray.get(bad.load_failure.remote(), timeout=120)
        assert "/nonexistent/model.gguf" in reason
        pid = ray.get(bad.pid.remote())
        waiting = Cluster(cluster.spec, cluster.directory_actor, [bad], cluster.hosts)
        with pytest.raises(ModelLoadError, match="worker 0 cannot load the model.*nonexistent"):
            waiting.wait_for_workers(count=len(cluster.workers) + 1, timeout_s=60)
        assert ray.get(bad.pid.remote()) == pid  # the same process: never restarted
        for call in (bad.free_pages, bad.check_idle, bad.steps, bad.target):  # each names the cause
            with pytest.raises(ModelLoadError, match="worker-bad serves nothing:.*nonexistent"):
                ray.get(call.remote(), timeout=60)
        assert "worker-bad" not in [w.worker_id for w in cluster.directory.workers()]
    finally:
        ray.kill(bad, no_restart=True)


def worker_actor_arguments(monkeypatch, spec: ClusterSpec) -> list[tuple[tuple, dict]]:
    """(args, kwargs) start_cluster(spec) gives each WorkerActor, recorded instead of starting actors (no Ray)."""
    actors = []

    class RecordingActorClass:  # ray.remote(cls).options(...).remote(*args, **kwargs)
        def __init__(self, cls):
            self.cls = cls

        def options(self, **options):
            return self

        def remote(self, *args, **kwargs):
            actors.append((self.cls, args, kwargs))

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "remote", RecordingActorClass)
    start_cluster(spec, wait=False)
    return [(args, kwargs) for cls, args, kwargs in actors if cls is WorkerActor]


def test_the_specs_quant_reaches_each_worker_actors_executor(monkeypatch):
    """start_cluster's arguments to each WorkerActor, given to the class in this process (no Ray): the
    spec's quant reaches TorchExecutor.load. An unknown quant is refused before any actor starts."""
    import torch

    from workers.torch_executor import TorchExecutor

    loads = []

    def load(cls, model=None, progress=None, **kwargs):
        loads.append(kwargs)
        raise ModelLoadError("recorded, not loaded")
    monkeypatch.setattr(TorchExecutor, "load", classmethod(load))
    workers = worker_actor_arguments(monkeypatch, ClusterSpec(workers=2, quant="int8",
                                                              torch_threads=torch.get_num_threads()))
    assert len(workers) == 2
    for args, kwargs in workers:
        assert WorkerActor(*args, **kwargs).load_failure() == "recorded, not loaded"
    assert [load["quant"] for load in loads] == ["int8", "int8"]
    with pytest.raises(ValueError, match=r"ClusterSpec.quant must be one of \['none', 'int8', 'int4'\], not 'int3'"):
        ClusterSpec(quant="int3")


def test_the_specs_executor_reaches_each_worker_actors_executor(monkeypatch):
    """As above, for the executor kind: the spec's reaches workers.executors.load_executor in each WorkerActor
    (which never imports vLLM itself). An unknown kind, or --quant on vLLM, is refused before any actor starts."""
    import torch

    from workers import executors

    loads = []

    def load_executor(kind="torch", model=None, progress=None, **kwargs):
        loads.append((kind, kwargs))
        raise ModelLoadError("recorded, not loaded")
    monkeypatch.setattr(executors, "load_executor", load_executor)
    workers = worker_actor_arguments(monkeypatch, ClusterSpec(workers=2, executor="vllm",
                                                              torch_threads=torch.get_num_threads()))
    assert [kwargs["executor"] for _, kwargs in workers] == ["vllm", "vllm"]
    for args, kwargs in workers:
        assert WorkerActor(*args, **kwargs).load_failure() == "recorded, not loaded"
    assert [(kind, load["quant"]) for kind, load in loads] == [("vllm", "none"), ("vllm", "none")]
    assert ClusterSpec().executor == "torch"
    with pytest.raises(ValueError, match=r"ClusterSpec.executor must be one of \['torch', 'vllm'\], not 'nope'"):
        ClusterSpec(executor="nope")
    with pytest.raises(ValueError, match="ClusterSpec.quant 'int4' is for the torch executor"):
        ClusterSpec(executor="vllm", quant="int4")


def test_bench_cluster_measures_both_modes(cluster, smollm2, tmp_path, capsys, monkeypatch):
    """python -m cluster.bench.cluster at its smallest. Its cluster mode joins this module's actors (same
    names) instead of starting a Ray of its own, and its embedded mode runs on the session's model."""
    from cluster.actors import cluster as actors_cluster
    from cluster.bench import cluster as bench_cluster
    from workers.torch_executor import TorchExecutor

    monkeypatch.setattr(actors_cluster, "init_local_ray", lambda **options: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the module's Ray outlives the benchmark's stop
    monkeypatch.setattr(TorchExecutor, "load", classmethod(lambda cls, model=None, progress=None, **kw:
                                                           cls(smollm2, num_pages=NUM_PAGES, **kw)))
    path = tmp_path / "cluster.json"
    assert bench_cluster.main(["--concurrency", "1", "--tokens", "4", "--repeats", "1", "--workers", "2",
                               "--dtype", "fp32", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert sorted(rows) == ["cluster c=1", "embedded c=1", "ratio c=1"]
    for name in ("cluster c=1", "embedded c=1"):
        assert all(rows[name][k] > 0 for k in ("ttft_ms", "tpot_ms", "passes_per_step", "exec_ms")), (name, rows)
    assert rows["ratio c=1"]["ttft_ms"] > 0 and rows["ratio c=1"]["tpot_ms"] > 0
    out = capsys.readouterr().out
    assert all(line in out for line in ("embedded c=1", "cluster c=1", "cluster/embedded c=1")), out
    settled(cluster)


def _long(client, programs):
    return client.launch(programs[TEXT], ["--prompt", "Tell me a long story.", "--max-tokens", "400",
                                          "--ignore-eos"])


def _first_message(stream):
    """Iterate to the first message (the inferlet is running on its worker); return the rest."""
    events = iter(stream)
    started = next(events)
    assert isinstance(started, Started)
    for event in events:
        if isinstance(event, Message):
            return started.instance_id, events
    raise AssertionError("the stream ended before any message")


def _host_of(instance_id: str) -> str:
    """The host id in an instance id (inferlet-<host id>-<n>)."""
    return instance_id.removeprefix("inferlet-").rsplit("-", 1)[0]


def test_draining_a_worker_moves_every_hosts_running_inferlets_off_it(cluster, client, programs):
    """Cluster.drain_worker: the inferlets running on worker-0, on either host actor, move to worker-1
    between their steps and run to their end; worker-0 has every page back at once."""
    streams = [client.launch(programs[TEXT], ["--prompt", f"Tell me a long story, number {i}.", "--max-tokens",
                                              "48", "--ignore-eos"]) for i in range(4)]
    running = [_first_message(s) for s in streams]
    on_worker_0 = {iid for iid, _ in running if cluster.directory.owner(iid).worker_id == "worker-0"}
    assert on_worker_0 and len({_host_of(iid) for iid, _ in running}) == 2, "the launches did not spread"
    drained = cluster.drain_worker("worker-0")
    moved = {m.instance_id: m for m in drained.inferlets}
    assert set(moved) == on_worker_0, drained
    assert all((m.src_worker, m.dst_worker) == ("worker-0", "worker-1") for m in moved.values())
    assert ray.get(cluster.workers[0].free_pages.remote()) == NUM_PAGES
    assert {cluster.directory.owner(iid).worker_id for iid in on_worker_0} == {"worker-1"}
    for iid, events in running:
        rest = list(events)
        assert isinstance(rest[-1], Finished), (iid, rest[-1])
    settled(cluster)


def test_a_killed_worker_fails_its_inferlets_others_finish_and_it_rejoins(cluster, client, programs, local_host):
    doomed = _long(client, programs)  # least loaded: one on each worker
    other = client.launch(programs[TEXT], ["--prompt", "Count to twenty.", "--max-tokens", "48", "--ignore-eos"])
    (doomed_id, doomed_events), (other_id, other_events) = _first_message(doomed), _first_message(other)
    victim = cluster.directory.owner(doomed_id).worker_id
    assert cluster.directory.owner(other_id).worker_id != victim, "both inferlets on one worker"
    index, target = int(victim.rsplit("-", 1)[1]), cluster.directory.target(victim)
    old_pid = ray.get(cluster.workers[index].pid.remote())
    ray.kill(cluster.workers[index], no_restart=False)  # Ray restarts it
    last = [e for e in doomed_events if not isinstance(e, Message)][-1]
    assert isinstance(last, Failed) and f"the worker {victim} at {target}" in last.error, last
    assert "lost" in last.error or "closed the connection" in last.error, last
    rest = list(other_events)  # the inferlet on the other worker runs to its end
    assert isinstance(rest[-1], Finished) and all(isinstance(e, Message) for e in rest[:-1]), rest[-1]
    wait_until(lambda: answers(cluster.workers[index].pid) not in (None, old_pid)
               and all(w.live for w in cluster.directory.workers()), 180, "the restarted worker to rejoin")
    settled(cluster)  # every page back, on the survivor too
    assert new_steps(cluster)[index] == 0  # a new process
    outcome = local_host.run(TEXT, ["--prompt", "What is the capital of France?", "--max-tokens", "8"],
                             worker_id=victim)  # this host dials the new address
    assert outcome.ok and "Paris" in "".join(outcome.messages), outcome
    assert new_steps(cluster)[index] > 0
    _, _, last = collect(client.launch(programs[TEXT], ["--prompt", "Hi", "--max-tokens", "4"]))
    assert isinstance(last, Finished)  # and so do the host actors, wherever the gateway placed it


def test_a_killed_host_fails_its_inferlets_and_their_pages_come_back(cluster, client, programs):
    runs = [_long(client, programs) for _ in range(2)]  # least loaded: one on each host
    started = [_first_message(r) for r in runs]
    survivor_host = ray.get(cluster.hosts[0].address.remote())[0]
    victim_host = ray.get(cluster.hosts[1].address.remote())[0]
    [(victim, events)] = [s for s in started if _host_of(s[0]) == victim_host]
    [(survivor, survivor_events)] = [s for s in started if s[0] != victim]
    ray.kill(cluster.hosts[1], no_restart=False)
    last = [e for e in events if not isinstance(e, Message)][-1]
    assert isinstance(last, Failed) and victim_host in last.error and "host" in last.error, last
    client.terminate(survivor)
    list(survivor_events)
    settled(cluster)  # the workers released what the dead host's inferlets held
    with pytest.raises(RequestFailed):
        client.send(victim, "anyone there?")  # it has ended
    # Ray restarts the host with a new id; with one inferlet busy on a host, the gateway places the next
    # launch on the other: between them, one runs on the restarted host
    wait_until(lambda: (answers(cluster.hosts[1].address) or (victim_host,))[0] != victim_host, 120,
               "the host to restart")
    restarted_host = ray.get(cluster.hosts[1].address.remote())[0]
    busy_id, busy_events = _first_message(_long(client, programs))
    placed_id, messages, last = collect(client.launch(programs[TEXT], ["--prompt", "What is the capital of France?",
                                                                       "--max-tokens", "8"]))
    client.terminate(busy_id)
    list(busy_events)
    assert isinstance(last, Finished) and "Paris" in "".join(messages), last
    placed_on = {_host_of(busy_id), _host_of(placed_id)}
    assert placed_on == {survivor_host, restarted_host}, f"the restarted host {restarted_host} ran nothing: {placed_on}"
    settled(cluster)


def test_a_restarted_directory_gets_its_workers_back(cluster, client, programs):
    cluster.directory.add_owner("marker", "nobody", "worker-0")  # gone once the directory restarted
    ray.kill(cluster.directory_actor, no_restart=False)  # Ray restarts it, empty

    def rejoined() -> bool:
        try:
            cluster.directory.owner("marker")
            return False  # the old directory still answers (ray.kill is asynchronous)
        except UnknownOwner:
            pass  # the new one answers, and every later call goes to it
        except DirectoryUnavailable:
            return False
        workers = answers(cluster.directory_actor.workers)
        return workers is not None and sum(w.live for w in workers) == 2
    wait_until(rejoined, 60, "both workers to join the restarted directory")
    _, messages, last = collect(client.launch(programs[TEXT], ["--prompt", "What is the capital of France?",
                                                               "--max-tokens", "8"]))
    assert isinstance(last, Finished) and "Paris" in "".join(messages)
    # the bus ran in the old directory's process: the hosts' connections broke, and they dial the new one
    message_across_hosts(cluster, "after-restart-news", "after-restart-jobs")
    settled(cluster)
