"""Draws target/soak.csv (from `imhost-bench --soak`) as docs/soak.png: each
node's resident memory and open file descriptors over the run."""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source, target = sys.argv[1], sys.argv[2]
series = defaultdict(lambda: {"t": [], "rss": [], "fds": []})
terminals = {}
for row in csv.DictReader(open(source)):
    node = series[row["node"]]
    node["t"].append(int(row["seconds"]) / 60)
    node["rss"].append(int(row["rss_kb"]) / 1024)
    node["fds"].append(int(row["fds"]))
    terminals[int(row["seconds"]) / 60] = int(row["terminals"])

fig, (rss, fds) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
for name, node in sorted(series.items()):
    rss.plot(node["t"], node["rss"], label=f"node {name}")
    fds.plot(node["t"], node["fds"], label=f"node {name}")
rss.set_ylabel("resident memory (MB)")
rss.set_ylim(bottom=0)
rss.legend()
fds.set_ylabel("open file descriptors")
fds.set_ylim(bottom=0)
fds.set_xlabel("minutes (Redis restarted at 1/3, node 1 restarted at 2/3)")
fig.suptitle("imhost soak: churning terminals and messages, plugin swaps, restarts")
fig.tight_layout()
fig.savefig(target, dpi=90)
