#!/usr/bin/env python3
"""Time-to-detect of each bug variant over N seeds (a precursor of `tdp-stress zoo`).

usage: scripts/detect-times.py [N_SEEDS] [CAP_SECONDS] [VARIANT ...]
Prints one line per run and, per variant, detected k/N with median and p90 seconds.
"""

from __future__ import annotations

import statistics
import sys

from stress import config
from stress.harness.supervisor import Supervisor
from stress.model.variants import VARIANTS


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    cap = sys.argv[2] if len(sys.argv) > 2 else "30s"
    names = sys.argv[3:] or [v.name for v in VARIANTS.values() if v.buggy]
    for name in names:
        times = []
        for seed in range(1, n + 1):
            cfg = config.load(None, {"run": {"duration": cap, "variant": name, "seed": seed,
                                             "expect_violation": True}})
            o = Supervisor(cfg).run()
            t = o.violations[0]["time_s"] if o.violations else None
            inv = o.violations[0]["invariant"] if o.violations else "-"
            print(f"{name} seed={seed} {o.exit_reason} ttd={t} {inv}", flush=True)
            if t is not None:
                times.append(t)
        if times:
            times.sort()
            p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
            print(f"== {name}: detected {len(times)}/{n}, median {statistics.median(times):.3f}s,"
                  f" p90 {p90:.3f}s, max {max(times):.3f}s", flush=True)
        else:
            print(f"== {name}: detected 0/{n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
