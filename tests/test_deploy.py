"""The Ray Serve application (deploy/app.py, deploy/config.yaml) answers a gRPC client.

A local Ray on loopback, Serve started with the config's grpc_options (on free ports), the config's
application with one CPU worker, few KV pages and two replicas; the client reaches it through Serve's gRPC proxy
with the metadata `application: pie`, as any client would. Serve's gRPC proxy listens on every
interface (it has no host option); the test only dials loopback.
"""
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from cluster.actors.cluster import init_local_ray  # noqa: E402
from cluster.api.grpc_client import Finished, Message, PieClient, RequestFailed, Started  # noqa: E402
from cluster.runtime.inferlet_build import build  # noqa: E402
from cluster.runtime.sandbox import Limits  # noqa: E402
from deploy.app import APP_NAME, SERVICER, AppArgs, app_builder, application  # noqa: E402
from helpers import recording_uploads, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "config.yaml"
TEXT = ROOT / "inferlets" / "examples" / "text_completion.py"
NUM_PAGES = 64
TOKEN = "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(path: Path) -> dict:
    """A Serve config file, checked against Serve's own schema."""
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    return config


@pytest.fixture(scope="module")
def config() -> dict:
    return serve_config(CONFIG)


@pytest.fixture(scope="module")
def program_path():
    """The text_completion component, built while Serve starts (a fresh cache builds it: seconds)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("path", build(TEXT)), daemon=True)
    thread.start()
    yield lambda: (thread.join(300), result["path"])[1]


@pytest.fixture(scope="module")
def gateway(config, program_path):
    """The Serve application from the config, on free ports; yields (target, application name)."""
    app = config["applications"][0]
    # 4 logical CPUs: each replica asks for one (two here, and a second application in one test)
    init_local_ray(num_cpus=4, log_to_driver=False)  # a Ray of our own even when a `ray start` cluster runs here
    try:
        grpc_port, http_port = free_port(), free_port()
        started = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={**config["grpc_options"], "port": grpc_port})
        # fp32: SmolLM2's first answer token is a near tie ('The' 0.152, 'L' 0.140) that bf16 breaks
        # toward 'L' on CPUs without AVX-512 (this 2-core AMD EPYC), and the answer then misses Paris
        args = {**app["args"], "workers": 1, "num_pages": NUM_PAGES, "bind_address": "127.0.0.1", "dtype": "fp32"}
        serve.run(application(AppArgs.parse(args), num_replicas=2), name=app["name"], route_prefix=app["route_prefix"])
        print(f"[test_deploy] Serve and the application up in {time.monotonic() - started:.1f} s")
        yield f"127.0.0.1:{grpc_port}", app["name"], f"http://127.0.0.1:{http_port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(gateway):
    target, name, _ = gateway
    with PieClient(target, metadata=(("application", name),)) as client:
        yield client


@pytest.fixture(scope="module")
def program(client, program_path) -> str:
    return client.upload(program_path())


@pytest.mark.parametrize("name", ["config.yaml", "config-gpu.yaml"])
def test_configs_name_the_servicer_builder_and_known_args(name):
    config = serve_config(CONFIG.parent / name)
    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER]
    (app,) = config["applications"]
    assert app["import_path"] == "deploy.app:app_builder" and app["name"] == APP_NAME
    spec = AppArgs.parse(app["args"]).spec()
    assert spec.worker_resources == ({"num_gpus": 1} if spec.device == "cuda" else {})
    assert app["args"]["quant"] == spec.quant == "none"  # int8 / int4 are CPU kernels: set per deployment
    # the GPU cluster runs vLLM's model code and kernels; the CPU config ours
    assert app["args"]["executor"] == spec.executor == ("vllm" if spec.device == "cuda" else "torch")
    # several replicas, autoscaled: none keeps state another needs, and the actors outlive any of them
    scaling = app["deployments"][0]["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and spec.detached


def test_bad_args_are_refused_naming_the_arg():
    with pytest.raises(ValueError, match=r"unknown application args \['worker'\]"):
        AppArgs.parse({"worker": 2})
    with pytest.raises(ValueError, match="args.device must be cpu or cuda"):
        AppArgs.parse({"device": "gpu"})
    with pytest.raises(ValueError, match="args.workers must be a positive integer"):
        AppArgs.parse({"workers": 0})
    with pytest.raises(ValueError, match="args.quant must be none, int8 or int4, not 'q4'"):
        AppArgs.parse({"quant": "q4"})
    with pytest.raises(ValueError, match="args.executor must be torch or vllm, not 'nope'"):
        AppArgs.parse({"executor": "nope"})
    with pytest.raises(ValueError, match="args.quant int4 is for the torch executor"):
        AppArgs.parse({"executor": "vllm", "quant": "int4"})


def test_the_quant_arg_reaches_the_cluster_spec():
    assert AppArgs.parse({"quant": "int4"}).spec().quant == "int4"
    assert AppArgs.parse({}).spec().quant == "none"


def test_the_executor_arg_reaches_the_cluster_spec():
    assert AppArgs.parse({"executor": "vllm"}).spec().executor == "vllm"
    assert AppArgs.parse({}).spec().executor == "torch"


def test_cluster_file_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CONFIG.parent / "cluster.yaml").read_text()))
    validate_config(config)
    assert "~/pie-cluster" in config["file_mounts"]
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert any('"torch==2.13.0"' in c for c in config["setup_commands"])


def test_serve_answers_a_grpc_client(client, program):
    started = time.monotonic()
    events = list(client.launch(program, ["--prompt", "What is the capital of France?", "--max-tokens", "8"]))
    print(f"[test_deploy] launch to finished through Serve: {time.monotonic() - started:.2f} s")
    assert isinstance(events[0], Started) and events[0].instance_id
    assert isinstance(events[-1], Finished), events[-1]
    assert all(isinstance(e, Message) for e in events[1:-1])
    assert "Paris" in "".join(e.text for e in events[1:-1])
    health = client.health()
    assert health.model.startswith("SmolLM2") and health.total_pages == NUM_PAGES


def test_with_one_application_serve_routes_calls_without_metadata(gateway):
    """So `pie submit --addr HOST:9000` reaches the application while it is the proxy's only one."""
    with PieClient(gateway[0]) as bare:
        assert bare.health().total_pages == NUM_PAGES


def test_upload_again_is_already_present(client, program_path, program, monkeypatch):
    sent = recording_uploads(client, monkeypatch)
    again = client.upload_program(program_path())
    assert (again.program_id, again.already_present) == (program, True)
    assert [len(c.data) for c in sent] == [0], "through Serve, a second upload sent more than the digest"


def test_errors_reach_the_client_as_status_codes(client, program):
    with pytest.raises(RequestFailed) as e:
        list(client.launch("0" * 64, []))
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "upload it first" in e.value.details
    with pytest.raises(RequestFailed) as e:
        client.send("no-such-inferlet", "hi")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RequestFailed) as e:
        client.upload(b"not wasm")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not WebAssembly" in e.value.details


def test_cancelling_a_launch_stops_its_inferlet(client, program):
    """cancel(terminate=True): Serve's proxy passes a cancelled stream on only when the cancellation
    finds it waiting for the replica's next event (not while it writes one), so the client also
    sends Terminate."""
    stream = client.launch(program, ["--prompt", "Write a long story about a dragon.", "--max-tokens", "400"])
    events = iter(stream)
    assert isinstance(next(events), Started)
    assert isinstance(next(events), Message)
    stream.cancel(terminate=True)
    wait_until(lambda: client.health().running == 0, 30, "the cancelled inferlet to stop")
    wait_until(lambda: client.health().free_pages == NUM_PAGES, 30, "its KV pages to come back")
    assert client.list() == []


def test_a_second_gateway_joins_the_cluster_and_checks_its_token(gateway, config, program):
    """A second application (another gateway replica) finds the running actors by name; with a token it
    refuses calls without it; with two applications on the proxy, the `application` metadata is needed."""
    target, _, http = gateway
    name = "pie-guarded"
    started = time.monotonic()
    serve.run(app_builder({**config["applications"][0]["args"], "workers": 1, "num_pages": NUM_PAGES,
                           "bind_address": "127.0.0.1", "token": TOKEN}), name=name, route_prefix=f"/{name}")
    print(f"[test_deploy] a second gateway joined in {time.monotonic() - started:.1f} s")
    try:
        with PieClient(target, metadata=(("application", name),)) as anonymous:
            with pytest.raises(RequestFailed) as e:
                anonymous.health()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "needs a token" in e.value.details
        with PieClient(target, token=TOKEN, metadata=(("application", name),)) as guarded:
            assert guarded.health().total_pages == NUM_PAGES  # the same single worker
            events = list(guarded.launch(program, ["--prompt", "Say hi.", "--max-tokens", "2"]))
            assert isinstance(events[-1], Finished), events[-1]  # the program, stored by the first gateway
        with PieClient(target) as bare:
            with pytest.raises(RequestFailed) as e:
                bare.health()
            assert e.value.code == grpc.StatusCode.NOT_FOUND and "Application metadata not set" in e.value.details
        # its OpenAI API, under its route prefix, checks the token too
        import openai

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{http}/{name}/v1", api_key="wrong", max_retries=0).models.list()
        guarded_api = openai.OpenAI(base_url=f"{http}/{name}/v1", api_key=TOKEN, max_retries=0, timeout=180)
        assert guarded_api.completions.create(model=guarded_api.models.list().data[0].id, prompt="Hi",
                                              max_tokens=2).usage.completion_tokens > 0
    finally:
        serve.delete(name)


def test_serves_the_openai_api_on_serves_http_proxy(gateway):
    """Serve's HTTP proxy routes /v1/... to the replica, which answers with the same routes as
    `pie serve --http-port`: models, a chat completion, a stream, an OpenAI error object."""
    import openai

    api = openai.OpenAI(base_url=f"{gateway[2]}/v1", api_key="any", max_retries=0, timeout=180)
    [model] = api.models.list().data
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = api.chat.completions.create(model=model.id, messages=question, max_tokens=16, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    chunks = list(api.chat.completions.create(model=model.id, messages=question, max_tokens=16, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=model.id, messages=question, temperature=9)
    assert e.value.body["param"] == "temperature"


def _replicas() -> list:
    """The running ServeGateway replica actors."""
    from ray.util import list_named_actors

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in list_named_actors(all_namespaces=True)
            if "ServeGateway" in a["name"]]


def _answers(call) -> bool:
    try:
        call()
        return True
    except RequestFailed:
        return False


def test_every_replica_killed_mid_stream_the_inferlets_run_on_and_their_clients_resume(client, program):
    """Two inferlets launched through the proxy; every replica that was serving is killed while their
    streams run. The streams break; Serve starts new replicas, which never saw the launches: they
    list both, terminate one, and the other's client re-attaches and gets every event after the last
    it had, once, then the end. Nothing is left behind.

    More tokens than the outbox holds (max_outbox_messages, 256): with no reader, each inferlet's send
    waits at that bound, so both still run whenever the new replicas come up (a 48-token run could end
    first: a CI run saw Serve take longer than that, and List then had neither)."""
    tokens = Limits().max_outbox_messages + 64
    long = ["--prompt", "Write a long story about a dragon.", "--max-tokens", str(tokens), "--ignore-eos"]
    streams = [client.launch(program, long) for _ in range(2)]
    events = [s.events_pb() for s in streams]
    seen = [[next(e) for _ in range(3)] for e in events]  # started and two messages each
    assert [[e.seq for e in s] for s in seen] == [[0, 1, 2]] * 2
    replicas = _replicas()
    assert len(replicas) == 2
    for replica in replicas:
        ray.kill(replica, no_restart=True)
    for stream in events:  # broken: an error, or an end without the inferlet's end
        try:
            tail = list(stream)
        except RequestFailed:
            tail = []
        assert not tail or tail[-1].WhichOneof("kind") == "message", tail[-1]
    wait_until(lambda: _answers(client.health), 180, "Serve to start new replicas")
    keep, stop = streams
    assert {keep.instance_id, stop.instance_id} <= {i.instance_id for i in client.list()}
    client.terminate(stop.instance_id)
    had = keep.last_seq  # the last event the broken stream gave
    rest = list(client.resume(keep).events_pb())
    assert [e.seq for e in rest] == list(range(had + 1, had + 1 + len(rest))), "events lost or repeated"
    # it sent more than the outbox held while nobody read: it waited for the new reader, then ran to its end
    assert rest[-1].WhichOneof("kind") == "finished" and rest[-1].seq > Limits().max_outbox_messages, rest[-1]
    stopped = list(client.resume(stop).events_pb())
    assert stopped[-1].WhichOneof("kind") == "failed" and "terminated by its client" in stopped[-1].failed.error
    wait_until(lambda: client.health().running == 0, 30, "both inferlets to end")
    # free, or held only by the prefix cache (the OpenAI API test before this one leaves some there)
    wait_until(lambda: (lambda h: h.free_pages + h.cached_pages)(client.health()) == NUM_PAGES, 30,
               "their KV pages to come back")
