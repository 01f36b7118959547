"""GPU time per kernel from Nsight Compute's CSV
(`ncu --csv --metrics gpu__time_duration.sum ...`), largest first.

    python3 kernel_times.py NCU_CSV [--top 25]
"""
import argparse
import collections
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    rows = [r for r in csv.reader(open(a.csv, errors="replace")) if len(r) > 10]
    if not rows:
        print("no kernel rows in", a.csv)
        return
    head = rows[0]
    name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
    total, count = collections.Counter(), collections.Counter()
    for r in rows[1:]:
        try:
            us = float(r[value].replace(",", "")) * scale.get(r[unit], 1e-3)
        except ValueError:
            continue
        k = r[name][:72]
        total[k] += us
        count[k] += 1
    print(f"{sum(count.values())} launches, {sum(total.values()) / 1e3:.3f} ms of GPU time")
    for k, us in total.most_common(a.top):
        print(f"{us:10.1f} us {count[k]:5d}x {us / count[k]:8.1f} us each  {k}")


if __name__ == "__main__":
    main()
