"""Where a step's time goes, from a strata log written with
RUST_LOG=...,strata::step=debug: per (tokens, rows sampled), the median time
to queue the forward pass, to have the logits on the host, and to have the
tokens sampled (ms since the step began).

    python3 step_times.py SERVE_LOG [--min-steps 5]

Queued close to "on host" means the host is the bottleneck; far below it,
the device is.
"""
import argparse
import collections
import re
import statistics

LINE = re.compile(
    r"step \d+: (\d+) tokens, (\d+) rows sampled; forward queued ([\d.]+) ms, "
    r"logits on host ([\d.]+) ms, sampled ([\d.]+) ms"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--min-steps", type=int, default=5)
    a = ap.parse_args()
    steps = collections.defaultdict(list)
    for line in open(a.log, errors="replace"):
        m = LINE.search(line)
        if m:
            steps[(int(m[1]), int(m[2]))].append([float(x) for x in m.groups()[2:]])
    print(f"{'tokens':>7} {'rows':>5} {'steps':>6} {'queued':>8} {'on host':>8} {'sampled':>8}  (median ms)")
    for (tokens, rows), v in sorted(steps.items()):
        if len(v) < a.min_steps:
            continue
        med = [statistics.median(x[i] for x in v) for i in range(3)]
        print(f"{tokens:7d} {rows:5d} {len(v):6d} {med[0]:8.2f} {med[1]:8.2f} {med[2]:8.2f}")


if __name__ == "__main__":
    main()
