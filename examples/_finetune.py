"""Shared by the fine-tuning examples: text -> blocks, transformers' Trainer, flashpatch on/off, report."""

from __future__ import annotations

import argparse
import json
import os
import time


def interpreter_without_gpu() -> None:
    """On a machine without a GPU, run flashpatch's kernels in Triton's CPU interpreter (a slow correctness run).
    Must happen before anything imports Triton's language (transformers may, through torch._dynamo)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def device() -> str:
    """This process's GPU: under `accelerate launch` each process gets its own (LOCAL_RANK), never GPU 0 for all."""
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--text", required=True, help="Plain-text training file (e.g. WikiText-2 raw).")
    p.add_argument("--flashpatch", action=argparse.BooleanOptionalAction, default=True,
                   help="Train through flashpatch's kernels (default) or the model's own attention.")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--packed", action="store_true",
                   help="Padding-free packing (DataCollatorWithFlattening): sequences end to end, position_ids "
                        "restarting; flashpatch's kernels keep them apart with segment ids.")
    p.add_argument("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="Write the loss curve as PNG.")
    p.add_argument("--json", default=None, help="Write losses and speed as JSON.")
    return p


class Blocks:
    """Consecutive `context`-token blocks of the text (labels = inputs; the model shifts them)."""

    def __init__(self, ids: list[int], context: int):
        self.ids, self.context = ids, context
        if len(ids) < context:
            raise SystemExit(f"the text has {len(ids)} tokens, fewer than --context {context}")

    def __len__(self):
        return len(self.ids) // self.context

    def __getitem__(self, i):
        import torch

        block = torch.tensor(self.ids[i * self.context:(i + 1) * self.context])
        return {"input_ids": block, "labels": block.clone()}


def _step_timer():
    """A Trainer callback recording when each optimizer step ends (steady-state speed skips the first steps,
    which include Triton's one-time kernel compiles and autotuning)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepTimer()


def train(model, encode, args, name: str):
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

    import flashpatch

    with open(args.text, encoding="utf-8") as f:
        ids = encode(f.read())
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    dataset = Blocks(ids, args.context)
    on_gpu = torch.cuda.is_available()
    report = flashpatch.apply(model) if args.flashpatch else None
    if report is not None:
        print(report)
    training_args = TrainingArguments(
        output_dir=os.path.join("out", f"finetune-{name}"), per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps, learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        bf16=on_gpu, use_cpu=not on_gpu, seed=args.seed, dataloader_drop_last=True, disable_tqdm=False,
    )
    collator = DataCollatorWithFlattening() if args.packed else default_data_collator
    timer = _step_timer()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    samples_per_step = args.batch_size * training_args.world_size
    warm = min(10, len(timer.times) // 5)
    steady = None
    if len(timer.times) - 1 > warm:
        steady = (len(timer.times) - 1 - warm) * samples_per_step / (timer.times[-1] - timer.times[warm])
    summary = {
        "model": name, "flashpatch": args.flashpatch, "packed": args.packed, "context": args.context,
        "batch_size": args.batch_size, "steps": result.global_step, "seconds": seconds,
        "processes": training_args.world_size,
        "samples_per_second": result.global_step * samples_per_step / seconds,
        "steady_samples_per_second": steady, "steady_after_steps": warm + 1,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "losses": losses, "fallbacks": dict(report.fallbacks) if report is not None else {},
    }
    print(f"final loss {losses[-1]:.4f} | {summary['samples_per_second']:.2f} samples/s"
          + (f" ({steady:.2f} after step {warm + 1})" if steady else "")
          + (f" | peak {summary['peak_gib']:.2f} GiB" if on_gpu else "")
          + (f" | fallbacks {summary['fallbacks']}" if summary["fallbacks"] else ""))
    if not main_process():
        return summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure(figsize=(6, 4))
        plt.plot(range(1, len(losses) + 1), losses, label="flashpatch" if args.flashpatch else "unpatched")
        plt.xlabel("step")
        plt.ylabel("training loss")
        plt.legend()
        plt.tight_layout()
        plt.savefig(args.plot, dpi=120)
    return summary
