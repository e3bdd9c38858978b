"""The command-line tools: workers/' streaming generator (`make run`) and benchmark, `pie run` and
`pie build`, and what `--quant` and `--executor` reach in `pie` and the benchmarks under cluster/bench/."""
import importlib
import importlib.util
import json
from types import SimpleNamespace

import pytest

from workers import bench, generate
from workers.errors import ModelLoadError


def test_generate_streams_the_answer(capsys, smollm2):
    generate.main(["--prompt", "What is the capital of France?", "--max-tokens", "12", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "<|im_end|>" not in out  # stop tokens end the stream, they are not printed


def test_generate_rejects_a_bad_token_budget(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--prompt", "hi", "--max-tokens", "0"])
    assert "--max-tokens" in capsys.readouterr().err


def test_bench_writes_rows_for_both_systems(tmp_path, capsys, smollm2):
    """Our rows per quant beside transformers' (fp32: bf16 matmuls are the slow path on AVX2-only CPUs)."""
    path = tmp_path / "rows.json"
    # 16 tokens: the rate divides by (time for N - time for 1), and with N = 3 the 2 extra tokens
    # (~40 ms) were within the noise of a busy machine: transformers once came out at -8 tok/s
    bench.main(["--batches", "1,2", "--dtypes", "fp32", "--quants", "none,int4", "--tokens", "16", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert {tuple(sorted(r)) for r in rows} == {("batch", "decode_tok_s", "dtype", "prefill_tok_s", "quant", "system")}
    for system, quant in (("pie-torch", "none"), ("pie-torch", "int4"), ("transformers", "none")):
        mine = [r for r in rows if (r["system"], r["quant"]) == (system, quant)]
        assert sorted(r["batch"] for r in mine if r["decode_tok_s"] is not None) == [1, 2]
        assert [r["prefill_tok_s"] > 0 for r in mine if r["decode_tok_s"] is None] == [True]
        assert all(r["decode_tok_s"] > 0 for r in mine if r["decode_tok_s"] is not None)
    table = capsys.readouterr().out
    assert "vs transformers" in table and "vs llama.cpp" in table
    # a ratio against transformers on our int4 rows
    assert any(line.split()[:3] == ["pie-torch", "fp32", "int4"] and line.rstrip().endswith("x")
               for line in table.splitlines() if line.strip())


def test_pie_run_prints_what_the_inferlet_sends(capsys, smollm2):
    from cluster import cli

    example = "inferlets/examples/text_completion.py"
    assert cli.main(["run", example, "--dtype", "fp32", "--", "--prompt", "What is the capital of France?",
                     "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_pie_run_answers_with_int4_weights(capsys, smollm2):
    """`pie run --quant int4` on the default question: the int4 kernels answer it as the float model does."""
    from cluster import cli

    assert cli.main(["run", "inferlets/examples/text_completion.py", "--dtype", "fp32", "--quant", "int4",
                     "--", "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.fixture
def executor_loads(monkeypatch) -> list[dict]:
    """TorchExecutor.load records its keyword arguments, then fails as a model that cannot be read."""
    from workers.torch_executor import TorchExecutor

    loads = []

    def load(cls, model=None, progress=None, **kwargs):
        loads.append(kwargs)
        raise ModelLoadError("recorded, not loaded")
    monkeypatch.setattr(TorchExecutor, "load", classmethod(load))
    return loads


@pytest.mark.parametrize("command", [["run", "app.py"], ["serve", "--port", "0"]])
def test_pie_passes_quant_to_the_executor(command, executor_loads, capsys):
    from cluster import cli

    assert cli.main([*command, "--quant", "int4"]) == 2  # the recording load's ModelLoadError
    assert cli.main(command) == 2
    assert [load["quant"] for load in executor_loads] == ["int4", "none"]
    assert "recorded, not loaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command, "--quant", "int3"])
    assert "invalid choice: 'int3' (choose from 'none', 'int8', 'int4')" in capsys.readouterr().err


@pytest.fixture
def executor_kinds(monkeypatch) -> list[tuple[str, dict]]:
    """workers.executors.load_executor records (kind, keyword arguments), then fails as a model that cannot be read."""
    from workers import executors

    loads = []

    def load_executor(kind="torch", model=None, progress=None, **kwargs):
        loads.append((kind, kwargs))
        raise ModelLoadError("recorded, not loaded")
    monkeypatch.setattr(executors, "load_executor", load_executor)
    return loads


@pytest.mark.parametrize("command", [["run", "app.py"], ["serve", "--port", "0"]])
def test_pie_passes_the_executor_kind_to_the_factory(command, executor_kinds, capsys):
    from cluster import cli

    assert cli.main([*command, "--executor", "vllm", "--dtype", "fp32"]) == 2  # the recording load's ModelLoadError
    assert cli.main(command) == 2
    assert [(kind, load["dtype"], load["quant"]) for kind, load in executor_kinds] == [
        ("vllm", "fp32", "none"), ("torch", "bf16", "none")]
    assert "recorded, not loaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command, "--executor", "tensorrt"])
    assert "invalid choice: 'tensorrt' (choose from 'torch', 'vllm')" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # vLLM reads quantized checkpoints; our int4 kernels are the torch executor's
        cli.main([*command, "--executor", "vllm", "--quant", "int4"])
    assert "--quant int4 is for the torch executor" in capsys.readouterr().err
    assert len(executor_kinds) == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_pie_run_with_the_vllm_executor_says_how_to_install_it(capsys, smollm2):
    """Without vLLM (the default .venv) the vllm executor is a clean load error naming `make setup-vllm`."""
    from cluster import cli

    assert cli.main(["run", "inferlets/examples/text_completion.py", "--executor", "vllm", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "error: the vLLM executor needs vLLM: run `make setup-vllm`" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option, value, field", [("--quant", "int8", "quant"), ("--executor", "vllm", "executor")])
def test_pie_serve_ray_carries_quant_and_executor_to_the_cluster_spec(option, value, field, monkeypatch, capsys):
    import ray

    from cluster import cli
    from cluster.actors import cluster as actors_cluster

    specs = []

    def start_cluster(spec):
        specs.append(spec)
        raise ModelLoadError("recorded, not started")
    monkeypatch.setattr(actors_cluster, "init_local_ray", lambda **options: None)
    monkeypatch.setattr(actors_cluster, "start_cluster", start_cluster)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    assert cli.main(["serve", "--ray", "--port", "0", option, value]) == 2
    assert [getattr(spec, field) for spec in specs] == [value]
    assert "recorded, not started" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["cluster.bench.openai", "cluster.bench.agentic.__main__",
                                    "cluster.bench.metrics_cost"])
def test_benchmarks_pass_quant_to_their_executor(module, executor_loads, monkeypatch):
    """Each benchmark with --dtype takes --quant to its executor (through cluster/bench/common.py)."""
    bench_module = importlib.import_module(module)
    if hasattr(bench_module, "start_tool"):  # the agentic benchmark's HTTP tool, started before the model
        monkeypatch.setattr(bench_module, "start_tool",
                            lambda latency_s: SimpleNamespace(server_address=("127.0.0.1", 9), shutdown=lambda: None))
    with pytest.raises(ModelLoadError, match="recorded"):
        bench_module.main(["--dtype", "fp32", "--quant", "int8"])
    assert [(load["dtype"], load["quant"]) for load in executor_loads] == [("fp32", "int8")]


@pytest.mark.parametrize("module", ["cluster.bench.openai", "cluster.bench.metrics_cost"])
def test_benchmarks_pass_the_executor_kind_to_the_factory(module, executor_kinds):
    """The benchmarks with --quant take --executor to workers.executors (through cluster/bench/common.py)."""
    bench_module = importlib.import_module(module)
    with pytest.raises(ModelLoadError, match="recorded"):
        bench_module.main(["--dtype", "fp32", "--executor", "vllm"])
    assert [(kind, load["dtype"], load["quant"]) for kind, load in executor_kinds] == [("vllm", "fp32", "none")]


def test_bench_cluster_embedded_mode_passes_the_executor_kind(executor_kinds):
    from cluster.bench import cluster as bench_cluster

    with pytest.raises(ModelLoadError, match="recorded"):
        bench_cluster.embedded("fp32", executor="vllm")
    assert [(kind, load["dtype"]) for kind, load in executor_kinds] == [("vllm", "fp32")]


def test_pie_build_writes_the_component_and_reports_errors(tmp_path, capsys):
    from cluster import cli

    out = tmp_path / "app.wasm"
    assert cli.main(["build", "inferlets/examples/text_completion.py", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\0asm"
    assert cli.main(["build", str(tmp_path / "missing.py")]) == 2
    assert "is not a Python source file" in capsys.readouterr().err
