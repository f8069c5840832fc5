# Sourced by the GPU batch scripts: bench_json OUT NAME TIMEOUT MODEL CONTEXTS REPEATS [EXTRA ARGS...] runs
# `flashpatch bench MODEL` (128 new tokens) into OUT/gen-NAME.json and .log, then prints its table.
bench_json() {
  local out=$1 name=$2 limit=$3 model=$4 contexts=$5 repeats=$6
  shift 6
  timeout "$limit" flashpatch bench "$model" --contexts "$contexts" --new-tokens 128 --repeats "$repeats" "$@" \
    --json "$out/gen-$name.json" > "$out/gen-$name.log" 2>&1
  python3 -c "import json; print(json.load(open('$out/gen-$name.json'))['markdown'])"
}
