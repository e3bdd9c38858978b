"""The inferlet-host benchmark, at its smallest: each of its rows is measured and written out."""
import json

from cluster.bench import host as bench_host


def test_bench_host_measures_launch_host_only_and_model_rows(tmp_path, capsys, smollm2):
    path = tmp_path / "host.json"
    assert bench_host.main(["--inferlets", "2", "--tokens", "4", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert results["launch"]["repeats"] == 20 and 0 < results["launch"]["median_ms"] <= results["launch"]["max_ms"]
    for row in ("host_only", "model"):
        r = results[row]
        assert (r["inferlets"], r["tokens_each"], r["passes"]) == (2, 4, 8), (row, r)
        assert r["tok_s"] > 0 and r["wall_s"] > 0 and r["mean_passes_per_step"] > 0, (row, r)
        assert r["launch_to_first_call_ms_median"] > 0, (row, r)
    assert results["host_only"]["host_ms_per_full_step"] > 0
    assert results["model"]["exec_ms_per_full_step"] > 0
    assert results["plain_loop_tok_s"] > 0
    out = capsys.readouterr().out
    for line in ("launch (cached) -> first handler call", "host-only, 2 inferlets x 4 tokens", "model bf16, 2 inferlets",
                 "plain decode loop, batch 2 x 4 tokens"):
        assert line in out, out
