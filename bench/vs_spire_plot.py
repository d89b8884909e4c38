"""Plots of the Sigil vs SPIRE bench from its CSV files (bench/vs-spire.sh runs this).

Usage: python vs_spire_plot.py <csv dir> <png dir>
Writes vs-spire-latency.png, vs-spire-rss.png and vs-spire-propagation.png; a plot whose CSV
is missing (its rows were not run) is skipped.
"""

import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

COLORS = {"SPIRE": "#d62728", "Sigil": "#1f77b4"}


def read(path):
    """{(system, series): [values]} and {(system, series, run): [values]}."""
    by_series, by_run = defaultdict(list), defaultdict(list)
    if not os.path.exists(path):
        return None, None
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            v = float(r["value"])
            by_series[(r["system"], r["series"])].append(v)
            by_run[(r["system"], r["series"], r["run"])].append(v)
    return by_series, by_run


def cdf(ax, values, **kw):
    v = sorted(values)
    n = len(v)
    ax.plot(v, [(i + 1) / n for i in range(n)], **kw)


def latency(src, dst):
    s, _ = read(os.path.join(src, "latency.csv"))
    if not s:
        return
    kinds = [
        ("x509_persistent", "FetchX509SVID, persistent connection"),
        ("x509_new_connection", "FetchX509SVID, new connection per call"),
        ("jwt_persistent", "FetchJWTSVID, persistent connection"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, kinds):
        for system in ("SPIRE", "Sigil"):
            v = s.get((system, key))
            if v:
                cdf(ax, v, color=COLORS[system], label=f"{system} ({len(v)} calls)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Workload API latency, cumulative distribution (all runs)")
    fig.tight_layout()
    fig.savefig(os.path.join(dst, "vs-spire-latency.png"), dpi=110)
    plt.close(fig)


def rss(src, dst):
    """Idle RSS from streams_rss.csv (series 0), RSS with K streams from summary.csv."""
    _, idle = read(os.path.join(src, "streams_rss.csv"))
    summary = os.path.join(src, "summary.csv")
    if not idle or not os.path.exists(summary):
        return
    pts = defaultdict(list)  # (system, run) -> [(streams, MiB)]
    for (system, series, run), v in idle.items():
        pts[(system, run)].append((int(series), min(v)))
    with open(summary, newline="") as f:
        for r in csv.DictReader(f):
            if r["key"].startswith("rss_streams_") and r["value"]:
                k = int(r["key"].rsplit("_", 1)[1])
                pts[(r["system"], r["run"])].append((k, float(r["value"])))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labelled = set()
    for (system, run), p in sorted(pts.items()):
        p.sort()
        ax.plot(
            [x[0] for x in p],
            [x[1] for x in p],
            "o-",
            color=COLORS[system],
            alpha=0.8,
            label=None if system in labelled else system,
        )
        labelled.add(system)
    ax.set_xlabel("open FetchX509SVID streams (one connection each)")
    ax.set_ylabel("agent RSS (MiB)")
    ax.set_title("Agent memory vs open streams (one line per run)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(dst, "vs-spire-rss.png"), dpi=110)
    plt.close(fig)


def propagation(src, dst):
    b, _ = read(os.path.join(src, "bundle_propagation.csv"))
    c, _ = read(os.path.join(src, "create_to_stream.csv"))
    if not b and not c:
        return
    sizes = sorted({int(k[1]) for k in (b or {})})
    n = len(sizes) + (1 if c else 0)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    axes = axes[0]
    for ax, k in zip(axes, sizes):
        for system in ("SPIRE", "Sigil"):
            v = b.get((system, str(k)))
            if v:
                cdf(ax, [x / 1000 for x in v], color=COLORS[system], label=system)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds after `bundle set` started (log scale)")
        ax.set_ylabel("fraction of streams updated")
        ax.set_title(f"Bundle change → {k:,} open streams", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if c:
        ax = axes[-1]
        for system in ("SPIRE", "Sigil"):
            v = c.get((system, "create_to_stream"))
            if v:
                cdf(ax, [x / 1000 for x in v], color=COLORS[system], label=f"{system} ({len(v)})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds after `entry create` started (log scale)")
        ax.set_ylabel("fraction of creates")
        ax.set_title("Entry created → its SVID on an open stream", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Propagation, cumulative distribution (all runs)")
    fig.tight_layout()
    fig.savefig(os.path.join(dst, "vs-spire-propagation.png"), dpi=110)
    plt.close(fig)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: vs_spire_plot.py <csv dir> <png dir>")
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    latency(src, dst)
    rss(src, dst)
    propagation(src, dst)
    print(f"plots in {dst}")


if __name__ == "__main__":
    main()
