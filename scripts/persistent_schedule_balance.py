"""How evenly the persistent sm90 backward's schedules load its programs (no GPU): per causal shape, the busiest
program's work over the mean, for the static rounds of `+persist` (tile k * grid + pid, every other round
reversed, tiles in L2 sections with key blocks longest first), for the dynamic hand-out of `+persist+dyn` (the same
order, each tile to the program that finishes first) and for the non-persistent launch (head-major, a head's key
blocks longest first, each program to the SM that frees first).

Work of a tile = the query blocks its key block meets, plus FIXED_STEPS for its K/V load and dK/dV store.
Usage: python3 scripts/persistent_schedule_balance.py [--sms 132]
"""

import argparse
import heapq

from flashpatch.kernels.backward_sm90 import SM90_BWD_CONFIGS, _l2_pairs

FIXED_STEPS = 3
SHAPES = [(1024, 16), (2048, 8), (4096, 4), (8192, 2), (16384, 1)]  # (N, batch): 16K tokens, 32 heads


def section_order(tile: int, blocks: int, section_heads: int, heads: int) -> tuple[int, int]:
    """kernels/forward_sm90.section_order in Python: (head, rank) of a tile."""
    per_section = section_heads * blocks
    section = tile // per_section
    first = section * section_heads
    in_section = min(section_heads, heads - first)
    within = tile - section * per_section
    rank = within // in_section
    return first + within - rank * in_section, rank


def tile_work(n_block: int, n: int, block_n: int, block_m: int) -> int:
    return (n + block_m - 1) // block_m - (n_block * block_n) // block_m + FIXED_STEPS


def greedy(works, sms: int) -> int:
    """The busiest program's work when each tile, in order, goes to the program that is free first."""
    loads = [0] * sms
    heapq.heapify(loads)
    for w in works:
        heapq.heappush(loads, heapq.heappop(loads) + w)
    return max(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()
    heads = 32
    print("causal; busiest program's work / mean")
    print(f"{'D':>4} {'N':>6} {'batch':>5} {'static':>7} {'dynamic':>8} {'non-persistent':>15}")
    for head_dim in (128, 64):
        config = SM90_BWD_CONFIGS[head_dim][0]
        block_n, block_m = config.block_n, config.block_m
        for n, batch in SHAPES:
            blocks, pairs = n // block_n, batch * heads
            tiles = blocks * pairs
            grid = min(tiles, args.sms)
            sections = _l2_pairs(pairs, 1, n, head_dim, 2)
            ordered = [tile_work(section_order(t, blocks, sections, pairs)[1], n, block_n, block_m)
                       for t in range(tiles)]
            static = [0] * grid
            for k in range((tiles + grid - 1) // grid):
                for pid in range(grid):
                    t = k * grid + (pid if k % 2 == 0 else grid - 1 - pid)
                    if t < tiles:
                        static[pid] += ordered[t]
            mean = sum(ordered) / grid
            head_major = [tile_work(t % blocks, n, block_n, block_m) for t in range(tiles)]
            print(f"{head_dim:>4} {n:>6} {batch:>5} {max(static) / mean:>7.3f} {greedy(ordered, grid) / mean:>8.3f} "
                  f"{greedy(head_major, args.sms) / mean:>15.3f}")


if __name__ == "__main__":
    main()
