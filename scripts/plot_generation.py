"""One generation plot (tokens/s and peak memory by context) from several `flashpatch bench --json` files of one model,
as `flashpatch bench --plot` draws a single run.

Usage: python3 scripts/plot_generation.py OUT.png "TITLE" FILE.json [FILE.json ...]
"""

import json
import sys

from flashpatch.bench_generate import GenRow, plot

out, title, *files = sys.argv[1:]
rows = [GenRow(**row) for path in files for row in json.load(open(path))["rows"]]
plot(rows, out, title)
print(f"{out}: {len(rows)} cells from {len(files)} files")
