"""The two command-line tools of workers/: the streaming generator (`make run`) and the benchmark."""
import json

import pytest

from workers import bench, generate


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
    path = tmp_path / "rows.json"
    # 16 tokens: the rate divides by (time for N - time for 1), and with N = 3 the 2 extra tokens
    # (~40 ms) were within the noise of a busy machine: transformers once came out at -8 tok/s
    bench.main(["--batches", "1,2", "--dtypes", "bf16", "--tokens", "16", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert {tuple(sorted(r)) for r in rows} == {("batch", "decode_tok_s", "dtype", "prefill_tok_s", "system")}
    for system in ("pie-torch", "transformers"):
        mine = [r for r in rows if r["system"] == system]
        assert sorted(r["batch"] for r in mine if r["decode_tok_s"] is not None) == [1, 2]
        assert [r["prefill_tok_s"] > 0 for r in mine if r["decode_tok_s"] is None] == [True]
        assert all(r["decode_tok_s"] > 0 for r in mine if r["decode_tok_s"] is not None)
    table = capsys.readouterr().out
    assert "pie-torch" in table and "x" in table.split("pie-torch", 1)[1]  # a ratio against transformers


def test_pie_run_prints_what_the_inferlet_sends(capsys, smollm2):
    from cluster import cli

    example = "inferlets/examples/text_completion.py"
    assert cli.main(["run", example, "--dtype", "fp32", "--", "--prompt", "What is the capital of France?",
                     "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_pie_build_writes_the_component_and_reports_errors(tmp_path, capsys):
    from cluster import cli

    out = tmp_path / "app.wasm"
    assert cli.main(["build", "inferlets/examples/text_completion.py", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\0asm"
    assert cli.main(["build", str(tmp_path / "missing.py")]) == 2
    assert "is not a Python source file" in capsys.readouterr().err
