"""flashpatch's generation speedups pooled over every repeat of several `flashpatch bench --json` files: one ratio per
repeat (runs of a repeat are back to back), per baseline and regime, with the median and a bootstrap 95 % interval.

Usage: python3 scripts/pooled_speedups.py FILE.json [FILE.json ...]
"""

import json
import random
import statistics
import sys

from flashpatch.bench_generate import GenRow, paired_ratios

pooled: dict = {}
for path in sys.argv[1:]:
    rows = {(r.impl, r.context, r.regime): r for r in (GenRow(**d) for d in json.load(open(path))["rows"])}
    for (impl, context, regime), ours in rows.items():
        if impl != "flashpatch":
            continue
        for (base_impl, base_context, base_regime), base in rows.items():
            if base_impl != "flashpatch" and (base_context, base_regime) == (context, regime):
                pooled.setdefault((base_impl, regime), []).extend(paired_ratios(ours, base))

rng = random.Random(0)
print("| flashpatch vs | regime | repeats | median ratio | 95 % interval |\n|---|---|---|---|---|")
for (base, regime), ratios in sorted(pooled.items()):
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    print(f"| {base} | {regime} | {len(ratios)} | {statistics.median(ratios):.2f}x | "
          f"{medians[49]:.2f}x-{medians[1949]:.2f}x |")
