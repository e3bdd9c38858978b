"""The programmability-tax benchmark runs both sides to equal lengths and writes its table and JSON."""
import json

from cluster.bench import tax as bench_tax


def test_bench_tax_measures_both_sides_at_each_concurrency(tmp_path, capsys, smollm2):
    path = tmp_path / "tax.json"
    assert bench_tax.main(["--concurrency", "1", "2", "--tokens", "4", "--repeats", "1", "--gather-ms", "5",
                           "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["concurrency"], r["policy"]) for r in rows] == [(1, "adaptive"), (2, "adaptive"), (2, "kort k=2 t=5ms")]
    for row in rows:
        for side in ("plain", "inferlet"):
            assert row[side]["tpot_ms"] > 0 and row[side]["ttft_ms"] > 0 and row[side]["tok_s"] > 0
        assert row["tpot_ratio"] > 0
        assert row["same_text"] == row["concurrency"]  # greedy, no stop: the same tokens on both sides
        assert row["inferlet"]["host_import_calls_per_token"] >= 2  # at least submit and wait
    table = capsys.readouterr().out
    assert "| 2 | adaptive | inferlet |" in table and "TPOT ratio" in table
