"""The agentic benchmark's table and chart; `python -m cluster.bench.agentic.report RESULT.json OUT.png [TITLE]`
draws the chart again from a run's JSON."""
from __future__ import annotations

GOALS = {"react": 2.0}  # issue 17's goals: ReAct 2x the client loop, the others 1.3x
DEFAULT_GOAL = 1.3


def table(results: dict) -> str:
    lines = ["| workload | what runs | inferlet tasks/min | client loop tasks/min | inferlet / loop | goal | "
             "inferlet mean / p90 s | loop mean / p90 s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        a, b = r["inferlet"], r["client_loop"]
        lines.append(f"| {name} | {r['what']} | {a['tasks_per_min']:.1f} | {b['tasks_per_min']:.1f} | "
                     f"**{r['inferlet_vs_loop']:.2f}x** | {GOALS.get(name, DEFAULT_GOAL):g}x | "
                     f"{a['mean_s']:.1f} / {a['p90_s']:.1f} | {b['mean_s']:.1f} / {b['p90_s']:.1f} |")
    react = results.get("react")
    if react and "ideal" in react:
        ideal = react["ideal"]
        lines.append(f"\nReAct ideal: {ideal['seconds']:.1f} s (decode {ideal['decode_s']:.1f} s at "
                     f"{ideal['decode_step_ms']:.1f} ms a step, prefill {ideal['prefill_s']:.1f} s, tools "
                     f"{ideal['tools_s']:.1f} s); the inferlets took {react['inferlet']['wall_s']:.1f} s: "
                     f"{react['inferlet_vs_ideal']:.2f}x the ideal")
    return "\n".join(lines)


def chart(results: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: matplotlib is not installed; pip install -e .[bench])")
        return
    names = list(results)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.4))
    ratios = [results[n]["inferlet_vs_loop"] for n in names]
    ax.barh(names, ratios, color=["#36c" if r >= GOALS.get(n, DEFAULT_GOAL) else "#c66"
                                  for n, r in zip(names, ratios)])
    for i, (n, r) in enumerate(zip(names, ratios)):
        goal = GOALS.get(n, DEFAULT_GOAL)
        ax.plot([goal] * 2, [i - 0.4, i + 0.4], color="k", linestyle=":", linewidth=1)
        ax.text(max(r, goal) + 0.08, i, f"{r:.2f}x ({results[n]['inferlet']['tasks_per_min']:.1f} vs "
                f"{results[n]['client_loop']['tasks_per_min']:.1f} tasks/min)", va="center", fontsize=8)
    ax.axvline(1.0, color="#999", linewidth=0.8)
    ax.set_xlim(0, max(ratios + [2.0]) * 1.6)
    ax.set_xlabel("inferlet tasks/min / client loop tasks/min (dotted: the goal)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart: {path}")


if __name__ == "__main__":
    import json
    import sys

    run = json.load(open(sys.argv[1]))
    chart(run["workloads"], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else
          f"Inferlet vs client loop over {run['client_loop_server']} ({run['dtype']})")
