"""Names the JIT addresses of `callgrind_annotate --inclusive=yes` lines
(on stdin) from a perf map (`/tmp/perf-PID.map`, written by a node run with
IMHOST_WASM_PROFILER=perfmap), and prints instructions per connect.

Usage: callgrind_annotate ... | python3 scripts/name-jit.py MAP CONNECTS
"""

import bisect
import re
import sys


def main() -> None:
    path, connects = sys.argv[1], int(sys.argv[2])
    ranges = []
    with open(path) as perf_map:
        for line in perf_map:
            start, size, name = line.rstrip("\n").split(" ", 2)
            ranges.append((int(start, 16), int(size, 16), name))
    ranges.sort()
    starts = [r[0] for r in ranges]
    for line in sys.stdin:
        cost = re.match(r"\s*([\d,]+)", line)
        addr = re.search(r"\?\?\?:0x([0-9a-f]+)", line)
        if not cost or not addr:
            continue
        at = int(addr.group(1), 16)
        i = bisect.bisect_right(starts, at) - 1
        name = "?"
        if i >= 0 and at < ranges[i][0] + ranges[i][1]:
            name = ranges[i][2]
        per_connect = int(cost.group(1).replace(",", "")) // connects
        print(f"  {per_connect:>8} per connect, with callees  {name[:110]}")


if __name__ == "__main__":
    main()
