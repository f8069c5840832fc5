"""Overlay the loss curves of fine-tuning runs (the examples' --json files), e.g. patched vs unpatched.

    python examples/plot_losses.py patched.json unpatched.json --out losses.png [--title TEXT]
"""

import argparse
import json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON files written by finetune_*.py --json")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(7, 4))
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        speed = run.get("steady_samples_per_second") or run["samples_per_second"]
        label = f"{run['model']} {'flashpatch' if run['flashpatch'] else 'unpatched'} ({speed:.1f} samples/s)"
        plt.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label, linewidth=1)
    plt.xlabel("step")
    plt.ylabel("training loss")
    if args.title:
        plt.title(args.title)
    plt.legend()
    plt.tight_layout()
    plt.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
