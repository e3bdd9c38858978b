"""The verdicts of `make soak` and `make chaos` (loadtests/soak.py, chaos.py) on recorded-looking data:
each check passes on a healthy run and fails on the fault it exists to catch. The drivers themselves
run for minutes against a real server; their recorded runs are in docs/benchmarks.md."""
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtests"))
import chaos  # noqa: E402
import soak  # noqa: E402
from soak import Sample  # noqa: E402


def samples(rss: list[float], every: float = 10.0) -> list[Sample]:
    return [Sample(i * every, mb, 90, 6, 100, 3) for i, mb in enumerate(rss)]


def test_memory_check_passes_a_flat_floor_with_spikes_and_fails_a_rising_one():
    spiky = [1000, 1040, 1500, 1010, 1000, 1600, 1020, 1005, 1001, 1300, 1010, 1020]  # a bomb's memory comes and goes
    ok = soak.memory_check(samples(spiky), load_s=110, warmup_s=20, window_s=30, max_growth=0.05)
    assert ok.ok and "+0.1%" in ok.detail and "peak 1600 MB" in ok.detail, ok
    leak = [1000 + 20 * i for i in range(12)]  # the floor rises: 1040 -> 1160 MB
    bad = soak.memory_check(samples(leak), load_s=110, warmup_s=20, window_s=30, max_growth=0.05)
    assert not bad.ok and "+11.5%" in bad.detail, bad


def test_memory_check_refuses_to_judge_windows_that_overlap():
    check = soak.memory_check(samples([1000] * 6), load_s=50, warmup_s=20, window_s=30, max_growth=0.05)
    assert not check.ok and "run longer" in check.detail


def test_pages_check_counts_the_prefix_cache_as_back_and_nothing_else():
    assert soak.pages_check(Sample(0, 1, 90, 10, 100, 0)).ok
    leaked = soak.pages_check(Sample(0, 1, 88, 10, 100, 0))
    assert not leaked.ok and "88 free + 10 cached = 98 of 100" in leaked.detail
    assert not soak.pages_check(Sample(0, 1, 90, 10, 100, 1)).ok  # something still runs
    assert not soak.pages_check(None).ok


def report(**counts) -> dict:
    """A locust report with `name=(count, failures)` per request key ('grpc_e2e' for 'grpc e2e')."""
    requests = {k.replace("_", " ", 1): {"count": c, "failures": f} for k, (c, f) in counts.items()}
    errors = [{"name": k.split(" ", 1)[1], "method": k.split(" ", 1)[0], "error": f"RuntimeError('{k} broke')",
               "occurrences": r["failures"]} for k, r in requests.items() if r["failures"]]
    return {"requests": requests, "errors": errors}


HEALTHY = dict(grpc_e2e=(40, 0), http_e2e=(20, 0), grpc_slow_reader=(9, 0), grpc_disconnect=(30, 0),
               http_disconnect=(25, 0), hostile_spin=(2, 0), hostile_raise=(3, 0))


def test_request_checks_fail_on_a_failed_normal_request_or_a_kind_that_never_ran():
    assert all(c.ok for c in soak.request_checks(report(**HEALTHY)))
    failed = {c.name: c for c in soak.request_checks(report(**{**HEALTHY, "http_e2e": (20, 1)}))}
    assert not failed["http e2e"].ok and "http e2e broke" in failed["http e2e"].detail
    assert all(c.ok for name, c in failed.items() if name != "http e2e")
    hostile = {c.name: c for c in soak.request_checks(report(**{**HEALTHY, "hostile_spin": (2, 1)}))}
    assert not hostile["hostile"].ok and "spin 2" in hostile["hostile"].detail
    missing = {c.name: c for c in soak.request_checks(report(**{**HEALTHY, "grpc_slow_reader": (0, 0)}))}
    assert not missing["grpc slow_reader"].ok and "none ran" in missing["grpc slow_reader"].detail


OPTS = Namespace(users=4, window=20.0, recovered=0.7)
SETTLED = {"running": 0, "free": 190, "cached": 10, "total": 200, "books": ""}


def steady(rate_per_s: float, until: float, dips=()) -> list[tuple[float, int]]:
    """Cumulative completions each second at a steady rate, with (start, end) spans of none."""
    points, done = [], 0.0
    for t in range(int(until) + 1):
        if not any(a <= t < b for a, b in dips):
            done += rate_per_s
        points.append((float(t), int(done)))
    return points


def test_chaos_judge_passes_kills_that_fail_only_their_own_launches_and_recover():
    kills = [chaos.Kill(60.0, "pie-worker-1", 12.0), chaos.Kill(120.0, "pie-host-0", 3.0)]
    errors = [{"name": "e2e", "method": "grpc", "occurrences": 2,
               "error": "the inferlet failed: lost the worker at 10.0.0.1:5: UNAVAILABLE"}]
    rep = {"requests": {"grpc e2e": {"count": 300, "failures": 2}}, "errors": errors}
    checks = chaos.judge(rep, kills, steady(2.0, 180, dips=[(60, 72)]), 180.0, OPTS, SETTLED)
    assert all(c.ok for c in checks), checks


def test_chaos_judge_fails_bare_errors_too_many_failures_lost_pages_and_no_recovery():
    kills = [chaos.Kill(60.0, "pie-worker-1", 12.0), chaos.Kill(120.0, "pie-host-0", None)]
    errors = [{"name": "e2e", "method": "grpc", "occurrences": 20, "error": "Launch: UNAVAILABLE: Socket closed"}]
    rep = {"requests": {"grpc e2e": {"count": 300, "failures": 20}}, "errors": errors}
    stuck = steady(2.0, 180, dips=[(60, 180)])  # nothing finishes after the first kill
    checks = {c.name: c for c in chaos.judge(rep, kills, stuck, 180.0, OPTS, {**SETTLED, "free": 180})}
    assert not checks["failures name their cause"].ok and "Socket closed" in checks["failures name their cause"].detail
    assert not checks["others finish"].ok and "at most 8" in checks["others finish"].detail
    assert not checks["restarts"].ok and "pie-host-0 never" in checks["restarts"].detail
    assert not checks["pages"].ok and "180 free + 10 cached of 200" in checks["pages"].detail
    assert not checks["throughput recovers"].ok and "0.00x" in checks["throughput recovers"].detail
