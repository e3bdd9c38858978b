"""python -m workers.bench: the llama.cpp row's errors and the chart (its rows: tests/test_cli_tools.py)."""

import pytest

from workers import bench

def test_llamacpp_row_without_llama_cpp_python_names_the_fix(smollm2):
    with pytest.raises(SystemExit, match="--llamacpp-python"):
        bench.main(["--dtypes", "fp32", "--batches", "1", "--tokens", "4", "--llamacpp"])

def test_chart_draws_the_decode_rows(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs the bench extra (pip install -e .[bench])")
    rows = [{"system": s, "dtype": "fp32", "quant": q, "batch": b, "decode_tok_s": r, "prefill_tok_s": None}
            for s, q, b, r in [("pie-torch", "int4", 1, 30.0), ("pie-torch", "int4", 8, 90.0), ("llama.cpp", "gguf", 1, 70.0)]]
    rows.append({"system": "pie-torch", "dtype": "fp32", "quant": "int4", "batch": 1, "decode_tok_s": None,
                 "prefill_tok_s": 200.0})
    bench.chart(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
