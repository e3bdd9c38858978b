"""python -m cluster.bench.capacity and python -m cluster.bench.scale at their smallest: each starts its
cluster(s), measures every part it reports, prints its table and writes its JSON. Checked: the rows and
fields are there and sane (counts add up, rates positive); no timing is asserted. Both run on one local
Ray (a benchmark finding Ray up ends its cluster's actors instead of Ray: seconds saved per cluster)."""
import json
import math

import pytest

ray = pytest.importorskip("ray")

from cluster.bench import capacity, scale  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from cluster.actors.cluster import init_local_ray

    init_local_ray(log_to_driver=False)
    yield
    ray.shutdown()


LAUNCH_CALLS = ("pick_host", "place_owner", "instance_started", "instance_ended", "owner_ended")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_capacity_measures_every_hop(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(capacity, "SCALES", ((8, 1), (16, 2)))  # the 512-GPU directory takes seconds to fill
    path = tmp_path / "capacity.json"
    assert capacity.main(["--launches", "6", "--concurrency", "2", "--concurrent-launches", "6", "--messages", "20",
                          "--directory-seconds", "0.3", "--directory-rounds", "16", "--copy-pages", "4",
                          "--copy-repeats", "2", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert list(results["directory_in_process"]) == ["8 GPUs", "16 GPUs"]
    for per_call in results["directory_in_process"].values():
        assert set(LAUNCH_CALLS) <= set(per_call) and all(positive(us) for us in per_call.values()), per_call
    for part in ("directory_actor", "bus"):
        assert [row["threads"] for row in results[part]] == [1, 4]
        assert all(positive(row["calls_per_s"]) and row["calls"] > 0 for row in results[part]), results[part]
    seq = results["launch"]["sequential"]
    assert seq["launches"] == 6
    # each launch makes each of these directory calls once: the gateway's pick, the host's place and records
    assert all(seq["directory_calls"].get(call) == pytest.approx(1.0) for call in LAUNCH_CALLS), seq["directory_calls"]
    assert all(positive(seq[k]) for k in ("started_ms", "end_ms", "gateway_pick_host_ms", "gateway_to_host_launch_ms"))
    assert seq["started_ms"] <= seq["end_ms"]
    concurrent = results["launch"]["concurrent"]
    assert concurrent["launches"] == 2 * 3 and positive(concurrent["launches_per_s"])  # 6 // 2 each
    assert set(results["relay"]) == {"via gateway", "host direct"}
    for row in results["relay"].values():
        assert row["messages"] == 2 * 2 * 20 and positive(row["messages_per_s"]), row  # 2 clients x 2 rounds
        assert "host-0_cpu_us" in row
    assert "gateway_cpu_us" in results["relay"]["via gateway"]
    copy = results["page_copy"]
    assert copy["pages"] == 4 and copy["moves"] == 2 and positive(copy["mb_per_s"])
    assert copy["page_bytes"] >= 16 * 30 * 3 * 64 * 2 * 2  # SmolLM2 bf16: 16 slots x 30 layers x 3 KV heads x 64 x K,V
    projection = results["projection"]  # each scale measured in process, each workload
    assert [(r["gpus"], r["workload"]) for r in projection] == [(g, w) for g in (8, 16) for w in capacity.WORKLOADS]
    for r in projection:
        assert all(positive(r[k]) for k in ("launches_per_s", "messages_per_s", "directory_cores", "gateway_cores",
                                            "host_cores")), r
    out = capsys.readouterr().out
    for heading in ("projection (", "directory, in process", "directory actor", "message bus", "launch -> started",
                    "event relay", "page copy between workers"):
        assert heading in out, out


def test_scale_runs_one_and_two_gateways_on_a_fixed_and_an_elastic_pool(tmp_path, capsys):
    path = tmp_path / "scale.json"
    assert scale.main(["--relay-clients", "12", "--messages", "10", "--model-clients", "2", "--tokens", "3",
                       "--rounds", "1", "--repeats", "1", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    rows = results["rows"]
    expected = [f"{pool} {load} {n}gw" for pool in ("fixed", "elastic") for load in ("relay", "model") for n in (1, 2)]
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        pool, load, gw = name.split()
        assert (row["pool"], row["load"], f"{row['gateways']}gw") == (pool, load, gw)
        clients = 12 if load == "relay" else 2
        assert row["launches"] == clients and positive(row["launches_per_s"]), row
        assert row["messages"] == (clients * 10 if load == "relay" else clients * 3), row
        assert all(positive(row[k]) for k in ("started_ms", "ttft_ms", "tpot_ms")), row
        assert all(k in row for k in ("gateways_cores", "hosts_cores", "directory_cores", "client_cores",
                                      "machine_cores"))
    assert {row["hosts"] for name, row in rows.items() if name.startswith("fixed")} == {1}
    assert {row["hosts"] for name, row in rows.items() if name.startswith("elastic")} == {2}  # it grew
    assert results["pools"]["elastic"]["grown_after_s"] > 0
    for label in ("fixed relay 2gw / 1gw", "fixed model 2gw / 1gw", "elastic / fixed relay 1gw",
                  "elastic / fixed model 2gw"):
        assert positive(results["ratios"][label]["launches_per_s"]), label
    out = capsys.readouterr().out
    assert all(name in out for name in expected) and "2gw / 1gw" in out, out
