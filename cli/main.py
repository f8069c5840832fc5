import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Flash attention for Hugging Face transformers models.", no_args_is_help=True,
                  add_completion=False)
console = Console()


@app.callback()
def main():
    """flashpatch: apply, verify and benchmark flash attention on transformers models."""


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Versions, the GPU found, and which kernel path serves it (or the fallback and why)."""
    from flashpatch.info import gather_info

    data = gather_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title="flashpatch info", show_header=False)
    for name, version in data["versions"].items():
        table.add_row(name, version or "not installed")
    table.add_row("device", data["device"])
    for key, value in (data["gpu"] or {}).items():
        table.add_row(f"gpu {key}", str(value))
    path = data["kernel_path"]
    table.add_row("kernel path", f"[bold]{path['name']}[/bold]")
    table.add_row("why", path["reason"])
    for bucket, cfg in data["tiles"].items():
        table.add_row(f"tiles {bucket}", "  ".join(f"{k}={v}" for k, v in cfg.items()))
    console.print(table)


def _fail_usage(message: str):
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _prepare_device(device: str | None) -> str:
    """cuda when present; on CPU the kernels run in Triton's interpreter (set before they are imported)."""
    import os

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        _fail_usage("--device cuda but no CUDA GPU is visible")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        console.print("[yellow]No GPU: the kernels run in Triton's CPU interpreter (slow; a correctness check, "
                      "not a speed test).[/yellow]")
    return device


def _write_json(data: dict, path: str | None):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


@app.command()
def verify(
    model: str = typer.Argument(..., help="Hub id, local dir, .gguf file, 'smollm2', or a preset "
                                          "(tiny-llama, llama2-7b, gpt2, gptj-6b, pythia-1.4b, neox-20b)."),
    text: str = typer.Option(None, "--text", help="Local text file (default: WikiText-2 test from the hub)."),
    dataset: str = typer.Option(None, "--dataset", help="Hub dataset as name[:config[:split]] with a text column."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Use only the first N tokens (CPU default 512)."),
    context: int = typer.Option(None, "--context", help="Window length (GPU default 2048, CPU 128)."),
    stride: int = typer.Option(None, "--stride", help="Window stride (default context/2 on GPU, context on CPU)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (GPU default bf16, CPU fp32)."),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
    generate_tokens: int = typer.Option(None, "--generate-tokens", help="Greedy tokens compared (GPU 128, CPU 16)."),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Allowed relative perplexity difference, percent."),
    min_top1: float = typer.Option(None, "--min-top1", help="Also require this top-1 agreement of logits (0-1)."),
    layers: int = typer.Option(None, "--layers", help="Presets: keep only this many layers."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    json_path: str = typer.Option(None, "--json", help="Also write the result as JSON to this file ('-': stdout)."),
):
    """Perplexity, logit and generation parity, unpatched vs patched. Exit 0 PASS, 1 FAIL, 2 bad usage."""
    from rich.progress import Progress

    from flashpatch.loading import DTYPES, UsageError, load_model, load_text

    device = _prepare_device(device)
    on_gpu = device == "cuda"
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    if dtype not in DTYPES:
        _fail_usage(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    if dtype == "bf16" and not on_gpu:
        _fail_usage("bf16 needs a GPU: Triton's CPU interpreter cannot run bf16 dots; use --dtype fp32 or fp16")
    context = context or (2048 if on_gpu else 128)
    stride = stride or (context // 2 if on_gpu else context)
    if not 0 < stride <= context:
        _fail_usage(f"--stride {stride} must be in 1..--context ({context})")
    if max_tokens is None and not on_gpu:
        max_tokens = 512
    try:
        text_data, source = load_text(text, dataset)
        with console.status(f"loading {model}"):
            loaded = load_model(model, dtype=DTYPES[dtype], device=device, layers=layers,
                                trust_remote_code=trust_remote_code)
    except UsageError as exc:
        _fail_usage(str(exc))

    from flashpatch.verify import VerifyOptions, run_verify

    limit = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(loaded.model.config, "n_positions", None)
    if limit and context > limit:
        context, stride = limit, min(stride, limit)
    opts = VerifyOptions(context=context, stride=stride, max_tokens=max_tokens, tolerance_pct=tolerance,
                         min_top1=min_top1, generate_tokens=generate_tokens or (128 if on_gpu else 16))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("windows (unpatched, then patched)", total=None)
        result = run_verify(loaded, text_data, source, opts,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    data = result.to_dict()
    if json_path == "-":
        typer.echo(json.dumps(data, indent=2))
    else:
        _write_json(data, json_path)
        _print_verify(result)
    raise typer.Exit(0 if result.passed else 1)


def _print_verify(result):
    table = Table(title="flashpatch verify", show_header=False)
    rows = [
        ("model", result.model), ("text", f"{result.text_source} ({result.tokens} tokens, {result.windows} windows "
                                          f"of {result.context}, stride {result.stride})"),
        ("dtype / device", f"{result.dtype} / {result.device}"),
        ("baseline attention", result.baseline_impl), ("patched with", result.kernel_path),
        ("perplexity baseline", f"{result.ppl_baseline:.4f}"), ("perplexity patched", f"{result.ppl_patched:.4f}"),
        ("relative difference", f"{result.ppl_rel_diff_pct:.4f} % (tolerance {result.tolerance_pct} %)"),
        ("max |logit diff|", f"{result.max_abs_logit_diff:.3g}"),
        ("mean |logit diff|", f"{result.mean_abs_logit_diff:.3g}"),
        ("top-1 agreement", f"{result.top1_agreement:.4%}" + (f" (required {result.min_top1:.0%})"
                                                               if result.min_top1 is not None else "")),
        (f"greedy {result.generate_tokens} tokens", "identical" if result.generation_identical
         else f"diverge at token {result.first_divergence}"),
        ("time baseline / patched", f"{result.seconds_baseline:.2f} s / {result.seconds_patched:.2f} s"),
    ]
    for reason, count in result.fallback_calls.items():
        rows.append(("fallback calls", f"{reason}: {count}"))
    for key, value in rows:
        table.add_row(key, value)
    verdict = "[bold green]PASS[/bold green]" if result.passed else "[bold red]FAIL[/bold red]"
    table.add_row("verdict", verdict)
    console.print(table)


if __name__ == "__main__":
    app()
