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
    if "autotune" in data:
        tune = data["autotune"]
        table.add_row("autotune", f"{'on' if tune['enabled'] else 'off'} ({tune['switch']}); cache {tune['cache']}")
    def fmt(cfg):
        return "  ".join(f"{k}={v}" for k, v in cfg.items())

    for bucket, cfg in data["tiles"].items():
        table.add_row(f"tiles {bucket}", fmt(cfg))
        for alt in data["tune_candidates"].get(bucket, []):
            table.add_row("  autotune candidate", fmt(alt))
    for bucket, cfg in data["backward_tiles"].items():
        table.add_row(f"backward tiles {bucket}", f"dK/dV: {fmt(cfg['dkdv'])} | dQ: {fmt(cfg['dq'])}")
    for bucket, cfg in data["decode_tiles"].items():
        table.add_row(f"decode tiles {bucket}", fmt(cfg))
    for head_dim, candidates in data.get("fp8_tiles", {}).items():
        table.add_row(f"fp8 tiles {head_dim}", "\n".join(fmt(c) for c in candidates))
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
    device_map: str = typer.Option(None, "--device-map", help="'auto': spread the model's layers over every "
                                                            "visible GPU (accelerate), as for models too big for one."),
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
                                trust_remote_code=trust_remote_code, device_map=device_map)
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


@app.command()
def bench(
    model: str = typer.Argument(None, help="As in verify; 'kernels' benchmarks the op itself. Default: the "
                                           "llama2-7b preset on a GPU, tiny-llama without one."),
    contexts: str = typer.Option(None, "--contexts", help="Comma-separated prompt lengths "
                                                          "(GPU default 512,1024,2048,4096,8192,16384)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="Greedy tokens generated (GPU 128, CPU 8)."),
    batch: int = typer.Option(1, "--batch"),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (GPU default bf16, CPU fp32)."),
    baselines: str = typer.Option("eager,sdpa", "--baselines", help="transformers implementations to compare."),
    repeats: int = typer.Option(2, "--repeats", help="Timed runs per cell (median)."),
    regimes: str = typer.Option("cold,warm", "--regimes", help="cold (unseen lengths), warm (repeated call)."),
    cache: str = typer.Option("dynamic", "--cache", help="dynamic (transformers' default) or static (StaticCache of "
                                                         "context + new tokens; generate compiles it on a GPU)."),
    layers: int = typer.Option(None, "--layers", help="Presets: keep only this many layers."),
    device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
    device_map: str = typer.Option(None, "--device-map", help="'auto': spread the model's layers over every "
                                                            "visible GPU (accelerate), as for models too big for one."),
    json_path: str = typer.Option(None, "--json", help="Write rows as JSON to this file."),
    plot_path: str = typer.Option(None, "--plot", help="Write a PNG: tokens/s and peak memory vs context."),
    head_dims: str = typer.Option("64,128", "--head-dims", help="kernels: head dims."),
):
    """Generation tokens/sec and memory by context, baselines vs flashpatch (or `bench kernels`)."""
    if model == "kernels":
        return _bench_kernels(contexts, head_dims, json_path)
    device = _prepare_device(device)  # before anything imports the kernels
    from rich.progress import Progress

    from flashpatch.bench_generate import bench_generation, markdown, plot, table_rows
    from flashpatch.loading import DTYPES, UsageError, load_model
    from flashpatch.presets import PRESET_CONFIGS

    on_gpu = device == "cuda"
    if not on_gpu:
        console.print("[yellow]Speed on a CPU says nothing about flash kernels: this run only exercises the "
                      "benchmark.[/yellow]")
    model = model or ("llama2-7b" if on_gpu else "tiny-llama")
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    if dtype not in DTYPES or (dtype == "bf16" and not on_gpu):
        _fail_usage(f"--dtype {dtype!r}: bf16/fp16 on a GPU, fp32 or fp16 on a CPU")
    try:
        context_list = [int(c) for c in (contexts or ("512,1024,2048,4096,8192,16384" if on_gpu else "32,64"))
                        .split(",")]
    except ValueError:
        _fail_usage(f"--contexts {contexts!r}: comma-separated integers")
    new_tokens = new_tokens or (128 if on_gpu else 8)
    regime_list = [r.strip() for r in regimes.split(",") if r.strip()]
    if not set(regime_list) <= {"cold", "warm"}:
        _fail_usage(f"--regimes {regimes!r}: cold and/or warm")
    baseline_list = tuple(b.strip() for b in baselines.split(",") if b.strip())
    if cache not in ("dynamic", "static"):
        _fail_usage(f"--cache {cache!r}: dynamic or static")
    try:
        with console.status(f"building {model}"):
            if model in PRESET_CONFIGS:
                from flashpatch.presets import build_model

                if device_map not in (None, "auto"):
                    raise UsageError(f"--device-map {device_map!r}: only 'auto' is supported")
                loaded_model = build_model(model, layers=layers, dtype=DTYPES[dtype],
                                           device="cpu" if device_map else device,
                                           # cold repeats may run past the context (_LengthSource)
                                           max_positions=max(context_list) + (repeats + 2) * (new_tokens + 1))
                if device_map:
                    from flashpatch.devices import dispatch_auto

                    loaded_model = dispatch_auto(loaded_model)
            else:
                loaded_model = load_model(model, dtype=DTYPES[dtype], device=device, device_map=device_map).model
    except UsageError as exc:
        _fail_usage(str(exc))
    cells = len(context_list) * len(regime_list) * (len(baseline_list) + 1)

    def save(rows, partial=False):  # after every context too: a long run may be cut off
        _write_json({"model": model, "dtype": dtype, "batch": batch, "new_tokens": new_tokens, "cache": cache,
                     "partial": partial, "rows": [r.to_dict() for r in rows],
                     "markdown": markdown(rows, baseline_list)}, json_path)

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{model}: {cells} cells", total=cells)
        rows = bench_generation(loaded_model, contexts=context_list, new_tokens=new_tokens, batch=batch,
                                baselines=baseline_list, repeats=repeats, regimes=regime_list, cache=cache,
                                progress=lambda: progress.advance(task),
                                on_context=lambda so_far: save(so_far, partial=True))
    header, cells_text = table_rows(rows, baseline_list)
    table = Table(title=f"flashpatch bench: {model}, {dtype}, batch {batch}, {new_tokens} new tokens, {cache} cache "
                        f"(cold = unseen lengths, warm = repeated call; x = median of per-repeat ratios)")
    for h in header:
        table.add_column(h, justify="right")
    for c in cells_text:
        table.add_row(*c)
    console.print(table)
    save(rows)
    if plot_path:
        plot(rows, plot_path, f"{model} ({dtype}, batch {batch}, {new_tokens} new tokens, {cache} cache)")


def _bench_kernels(lengths: str | None, head_dims: str, json_path: str | None):
    import torch

    if not torch.cuda.is_available():
        _fail_usage("bench kernels needs a CUDA GPU (the CPU interpreter's speed means nothing)")
    from rich.progress import Progress

    from flashpatch.bench_kernels import (BACKWARD_IMPLS, DECODE_CACHES, SDPA_BACKENDS, SEED_LENGTHS, bench_backward,
                                          bench_decode, bench_forward, decode_markdown, markdown_table)

    impls = ["flashpatch"] + [f"sdpa-{b}" for b in SDPA_BACKENDS] + ["flex"]
    decode_impls = impls[:-1]  # FlexAttention would compile per cache length
    if torch.cuda.get_device_capability() >= (9, 0):
        impls.append("flashpatch-fp8")  # the FP8 forward, quantization included (Hopper)
    length_list = [int(n) for n in lengths.split(",")] if lengths else list(SEED_LENGTHS)
    dims = [int(d) for d in head_dims.split(",")]
    batches = (1, 8, 32)
    cells = len(length_list) * len(dims) * 2
    total = cells * (len(impls) + 2 * len(BACKWARD_IMPLS)) + 2 * len(DECODE_CACHES) * len(batches) * len(decode_impls)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("forward, backward and decode kernels", total=total)
        step = lambda: progress.advance(task)  # noqa: E731
        rows = bench_forward(impls, lengths=length_list, head_dims=dims, progress=step)
        train_rows = bench_backward(lengths=length_list, head_dims=dims, progress=step)
        bwd_rows = bench_backward(lengths=length_list, head_dims=dims, backward_only=True, progress=step)
        decode_rows = bench_decode(decode_impls, batches=batches, progress=step)
        decode_graph_rows = bench_decode(decode_impls, batches=batches, progress=step, cuda_graph=True)
    console.print("Forward, batch 8, 32 heads, bf16 (TFLOPS):")
    console.print(markdown_table(rows, impls))
    console.print("Forward + backward (TFLOPS count 3.5x the forward's FLOPs):")
    console.print(markdown_table(train_rows, BACKWARD_IMPLS))
    console.print("Backward alone (2.5x the forward's FLOPs):")
    console.print(markdown_table(bwd_rows, BACKWARD_IMPLS))
    console.print("Decode, one query token, 32 heads, head dim 128, bf16 (TB/s of K/V read), calls back to back "
                  "(host launch cost included):")
    console.print(decode_markdown(decode_rows, decode_impls))
    console.print("The same, timed as CUDA-graph replays (GPU time alone, every backend alike):")
    console.print(decode_markdown(decode_graph_rows, decode_impls))
    _write_json({"rows": [r.to_dict() for r in rows], "forward_backward_rows": [r.to_dict() for r in train_rows],
                 "backward_rows": [r.to_dict() for r in bwd_rows], "decode_rows": [r.to_dict() for r in decode_rows],
                 "decode_graph_rows": [r.to_dict() for r in decode_graph_rows]}, json_path)

if __name__ == "__main__":
    app()
