"""Draws the curves of `imhost-bench --only-sockets --csv DIR`:
DIR/memory.csv as docs/socket-memory.png (server RSS growth against connections)
and DIR/latency.csv as docs/socket-latency.png (p50 and p99 against offered rate)."""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source, docs = sys.argv[1], sys.argv[2]

memory = defaultdict(lambda: ([], []))
for row in csv.DictReader(open(f"{source}/memory.csv")):
    xs, ys = memory[row["server"]]
    xs.append(int(row["connections"]))
    ys.append(int(row["rss_bytes"]) / 2**20)
fig, ax = plt.subplots(figsize=(7, 4))
for server, (xs, ys) in memory.items():
    points = sorted(zip(xs, ys))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server)
ax.set_xlabel("idle connections")
ax.set_ylabel("server RSS growth (MiB)")
ax.set_title("Memory against connections")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(f"{docs}/socket-memory.png", dpi=100)

latency = defaultdict(lambda: ([], [], []))
for row in csv.DictReader(open(f"{source}/latency.csv")):
    xs, p50, p99 = latency[row["server"]]
    xs.append(int(row["offered_per_sec"]) / 1000)
    p50.append(float(row["p50_ms"]))
    p99.append(float(row["p99_ms"]))
fig, ax = plt.subplots(figsize=(7, 4))
for server, (xs, p50, p99) in latency.items():
    line = ax.plot(xs, p50, marker="o", label=f"{server} p50")[0]
    ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{server} p99")
ax.set_xlabel("offered deliveries/s (thousands)")
ax.set_ylabel("latency (ms)")
ax.set_yscale("log")
ax.set_title("Latency against offered rate")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{docs}/socket-latency.png", dpi=100)
