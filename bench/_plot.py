"""The bench's one picture: throughput and completion latency against
concurrency, one line per server, so a regression in either shows at a glance
without reading the JSON. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from typing import Any


def plot(results: dict[str, list[dict[str, Any]]], path: str, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"netra": "tab:blue", "peer": "tab:orange", "floor": "tab:green"}
    for server, scenarios in results.items():
        rows = sorted((s for s in scenarios if "error" not in s), key=lambda s: s["users"])
        if not rows:
            continue
        users = [s["users"] for s in rows]
        color = colors.get(server)
        ax_rate.plot(users, [s["runs_per_s"] for s in rows], "o-", color=color, label=server)
        p50 = [s["ttc_ms"]["p50"] or float("nan") for s in rows]
        p99 = [s["ttc_ms"]["p99"] or float("nan") for s in rows]
        ax_lat.plot(users, p50, "o-", color=color, label=f"{server} p50")
        ax_lat.plot(users, p99, "s--", color=color, label=f"{server} p99")
    for ax in (ax_rate, ax_lat):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent users")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax_rate.set_ylabel("runs/s (succeeded)")
    ax_rate.set_title("throughput")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("time to completion (ms)")
    ax_lat.set_title("send -> agent_completed")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
