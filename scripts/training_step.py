"""Training steps on one GPU, forward + backward + AdamW: samples/sec and peak memory, sdpa and flashpatch side by
side in one process (eager too with --eager). Random weights from real configs, bf16:

  * the Llama-2-7B shape (32 heads, head dim 128; 8 layers: a full 7B model's AdamW state does not fit one GPU) at
    batch x context 4x2K, 2x8K and 1x16K;
  * the GPT-J-6B shape (16 heads, head dim 256; 4 layers) at 4x2K.

Usage: python3 scripts/training_step.py [--eager] [--out DIR]   (writes DIR/training.json; DIR defaults to $OUT)
"""

import argparse
import json
import os
import time

import torch
import transformers
import triton

from flashpatch.bench.train import bench_training, markdown
from flashpatch.presets import build_model

RUNS = (("llama2-7b", 8, [(4, 2048), (2, 8192), (1, 16384)]), ("gptj-6b", 4, [(4, 2048)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager", action="store_true", help="also time transformers' eager attention")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    baselines = ("eager", "sdpa") if args.eager else ("sdpa",)
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python3 scripts/training_step.py" + (" --eager" if args.eager else "")}
    print(env, flush=True)
    results = {"env": env, "runs": []}
    for preset, layers, shapes in RUNS:
        model = build_model(preset, layers=layers, dtype=torch.bfloat16, device="cuda",
                            max_positions=max(context for _, context in shapes))
        rows = bench_training(model, shapes, baselines=baselines, progress=lambda: print(".", end="", flush=True))
        table = markdown(rows, baselines)
        results["runs"].append({"preset": preset, "layers": layers, "rows": [r.to_dict() for r in rows],
                                "markdown": table})
        with open(os.path.join(args.out, "training.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"\n{preset}, {layers} layers\n{table}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
