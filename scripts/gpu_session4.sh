#!/usr/bin/env bash
# H100 runs after the single-launch decode and the direct launcher (issues 5, 7). Usage:
#   scripts/gpu_session4.sh check OUT_DIR   the GPU suite (kernel tests), host time per call, decode tile sweep
#   scripts/gpu_session4.sh tests OUT_DIR   the GPU tests these changes touch, then decode bandwidth (eager and graph)
#   scripts/gpu_session4.sh gen OUT_DIR     generation tokens/s, dynamic cache and Llama's static cache
#   scripts/gpu_session4.sh recheck OUT_DIR after the per-call counters: tests, host time, batch-1 decode, Llama static
set -u
out=$2
export PYTHONUNBUFFERED=1
if [ "$1" = check ]; then
  timeout 300 python3 -m pytest -v -n 8 -ra --timeout 100 tests/test_decode.py tests/test_launch.py \
    tests/test_gpu_attention.py tests/test_static_cache.py tests/test_forward_tma.py tests/test_attention_op.py \
    > "$out/pytest-parallel.log" 2>&1
  grep -E "FAILED|ERROR" "$out/pytest-parallel.log" | sed 's/^.*\(FAILED\|ERROR\)/\1/' | sort -u | head -30
  tail -2 "$out/pytest-parallel.log"
  timeout 60 python3 scripts/host_overhead.py 2>&1 | tee "$out/host-overhead.txt"
  OUT=$out timeout 150 python3 scripts/gpu_decode.py --sweep --no-bench > "$out/decode-sweep-run.txt" 2>&1
  tail -1 "$out/decode-sweep-run.txt"
  python3 - "$out/decode-sweep.txt" <<'PY'
import collections, sys
best = collections.defaultdict(list)
for line in open(sys.argv[1]):
    *head, tbs = line.split()
    best[tuple(head[:2])].append((float(tbs) if tbs[0].isdigit() else 0.0, " ".join(head[2:])))
for case, rows in best.items():
    rows.sort(reverse=True)
    print(case, [f"{t:.2f} {c}" for t, c in rows[:3]], "worst", f"{rows[-1][0]:.2f}")
PY
elif [ "$1" = tests ]; then
  timeout 330 python3 -m pytest -q -n 8 -ra --timeout 150 --tb=short tests/test_decode.py tests/test_launch.py \
    tests/test_gpu_attention.py tests/test_static_cache.py tests/test_forward_tma.py tests/test_attention_op.py \
    > "$out/pytest-gpu.log" 2>&1
  grep -E "^E  |^FAILED|passed|failed" "$out/pytest-gpu.log" | head -30
  OUT=$out timeout 200 python3 scripts/gpu_decode.py --graph 2>&1 | tail -32
elif [ "$1" = recheck ]; then
  timeout 240 python3 -m pytest -q -n 8 -ra --timeout 200 --tb=short tests/test_decode.py tests/test_static_cache.py \
    tests/test_launch.py tests/test_gpu_attention.py -k "split or static or float32 or every_table or seqused or launch" \
    > "$out/pytest-recheck.log" 2>&1
  grep -E "^E  |^FAILED|passed|failed" "$out/pytest-recheck.log" | head -20
  timeout 60 python3 scripts/host_overhead.py 2>&1 | tee "$out/host-overhead.txt" | head -8
  OUT=$out timeout 90 python3 scripts/gpu_decode.py --graph --batch1 2>&1 | tail -17
  flashpatch bench llama2-7b --cache static --baselines sdpa --contexts 512 --new-tokens 128 --repeats 1 \
    --json "$out/gen-llama-static.json" 2>&1 | tail -3
  python3 -c "import json; print(json.load(open('$out/gen-llama-static.json'))['markdown'])"
else
  flashpatch bench gpt2 --contexts 512,2048,8192 --new-tokens 128 --repeats 1 --json "$out/gen-gpt2-dynamic.json" | tail -9
  flashpatch bench llama2-7b --contexts 512,4096 --new-tokens 128 --repeats 1 --json "$out/gen-llama-dynamic.json" | tail -7
  flashpatch bench llama2-7b --cache static --baselines sdpa --contexts 512 --new-tokens 128 --repeats 1 \
    --json "$out/gen-llama-static.json" | tail -5
fi
