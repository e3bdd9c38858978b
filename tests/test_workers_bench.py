"""python -m workers.bench: our executor's rows per quant beside transformers, and the llama.cpp row's errors."""
import json

import pytest

from workers import bench


def test_bench_prints_a_row_per_quant_beside_transformers(tmp_path, capsys, smollm2):
    path = tmp_path / "rows.json"
    bench.main(["--dtypes", "fp32", "--quants", "none,int4", "--batches", "1", "--tokens", "4", "--json", str(path)])
    rows = json.loads(path.read_text())
    ours = {(r["quant"], r["decode_tok_s"] is None) for r in rows if r["system"] == "pie-torch"}
    assert ours == {("none", False), ("none", True), ("int4", False), ("int4", True)}
    assert {r["system"] for r in rows} == {"pie-torch", "transformers"}
    for r in rows:
        assert (r["decode_tok_s"] or r["prefill_tok_s"]) > 0
    table = capsys.readouterr().out
    assert "vs transformers" in table and "vs llama.cpp" in table
    assert any(line.startswith("pie-torch    fp32  int4") and line.rstrip().endswith("x") for line in table.splitlines())


def test_llamacpp_row_without_llama_cpp_python_names_the_fix(smollm2):
    with pytest.raises(SystemExit, match="--llamacpp-python"):
        bench.main(["--dtypes", "fp32", "--batches", "1", "--tokens", "4", "--llamacpp"])
