"""`pie serve --ray --executor vllm`'s path: a local Ray cluster whose worker actor runs the vLLM executor
(its own process, its own one-rank vLLM state), serving an inferlet through the gateway over gRPC."""
import pytest

pytest.importorskip("vllm", reason="the vLLM executor needs .venv-vllm (make setup-vllm; make test-vllm)")
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.vllm

from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster  # noqa: E402
from cluster.api.grpc_client import Finished, Message, PieClient  # noqa: E402
from cluster.api.grpc_server import serve_service  # noqa: E402
from cluster.runtime.inferlet_build import build  # noqa: E402
from helpers import wait_until  # noqa: E402

NUM_PAGES = 64


def test_a_ray_worker_on_the_vllm_executor_answers_through_the_gateway():
    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        spec = ClusterSpec(workers=1, hosts=1, num_pages=NUM_PAGES, torch_threads=1, bind_address="127.0.0.1",
                           dtype="fp32", executor="vllm")
        cluster = start_cluster(spec)
        [worker] = cluster.workers
        assert ray.get(worker.load_failure.remote()) is None
        assert ray.get(worker.free_pages.remote()) == NUM_PAGES
        assert cluster.directory.model()["info"]["executor"] == "vllm"
        server = serve_service(cluster.gateway_service(), port=0)
        try:
            with PieClient(server.target) as client:
                program = client.upload(build("inferlets/examples/text_completion.py"))
                events = list(client.launch(program, ["--prompt", "What is the capital of France?",
                                                      "--max-tokens", "16"]))
        finally:
            server.stop(0)
        text = "".join(e.text for e in events if isinstance(e, Message))
        assert isinstance(events[-1], Finished), events[-1]
        assert "Paris" in text, text
        wait_until(lambda: ray.get(worker.free_pages.remote()) == NUM_PAGES, 30, "the worker's pages to come back")
        ray.get(worker.check_idle.remote())
    finally:
        ray.shutdown()
