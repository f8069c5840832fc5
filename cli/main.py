"""The `flashpatch` command: typer options in, flashpatch's functions called, tables or JSON out.

Every option is checked before the work starts (exit 2 with one line naming the fix); the run then shows
progress, as a bar on a terminal and as plain lines in a log.
"""

import contextlib
import json
import time

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from flashpatch import __version__
from flashpatch.presets import PRESET_CONFIGS
from flashpatch.usage import UsageError, at_least, device_name, int_list, name_list, need_module, output_file

app = typer.Typer(help="Flash attention for Hugging Face transformers models.", no_args_is_help=True,
                  add_completion=False)
console = Console()
err_console = Console(stderr=True)

PRESETS = ", ".join(PRESET_CONFIGS)
MODEL_HELP = (f"A preset ({PRESETS}: random weights from real configs), 'smollm2' (real weights, offline), a .gguf "
              "file, a local folder or a hub id (owner/name).")
EXIT_HELP = "Exit 0 PASS, 1 FAIL (a parity criterion missed), 2 bad usage, 3 NOT SERVED (flashpatch left the model "
EXIT_HELP += "as it is, or some of its attention calls ran the model's own attention)."


def _version(show: bool):
    if show:
        typer.echo(f"flashpatch {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print flashpatch's version and exit.")):
    """flashpatch: apply, verify and benchmark flash attention on transformers models."""


def _fail_usage(message: str):
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@contextlib.contextmanager
def _usage_errors():
    """UsageError anywhere inside: its line, exit 2."""
    try:
        yield
    except UsageError as exc:
        _fail_usage(str(exc))


@contextlib.contextmanager
def _progress(what: str, total: int | None, out: Console):
    """Yields update(done=None, total=None): done=None advances by one. A bar on a terminal; without one (a log,
    CI) a plain line at each tenth of the way and at least every 30 s."""
    if out.is_terminal:
        from rich.progress import Progress

        with Progress(console=out, transient=True) as bar:
            task = bar.add_task(what, total=total)

            def update(done=None, new_total=None):
                if new_total is not None:
                    bar.update(task, total=new_total)
                bar.update(task, advance=1) if done is None else bar.update(task, completed=done)

            yield update
        return
    state = {"done": 0, "total": total, "shown": -1, "at": time.monotonic()}
    out.print(f"{what}: started", highlight=False)

    def update(done=None, new_total=None):
        state["total"] = new_total or state["total"]
        state["done"] = state["done"] + 1 if done is None else done
        done, total = state["done"], state["total"]
        tenth = 10 * done // total if total else done
        if tenth != state["shown"] or time.monotonic() - state["at"] > 30 or done == total:
            state["shown"], state["at"] = tenth, time.monotonic()
            out.print(f"{what}: {done}/{total or '?'} ({time.strftime('%H:%M:%S')})", highlight=False)

    yield update


def _choose_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype), checked; cuda when present. On a CPU the kernels run in Triton's interpreter, switched on
    here: before anything imports Triton's language (transformers does, through torch._dynamo)."""
    import os

    import torch

    device = device_name(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} but no CUDA GPU is visible; use --device cpu")
    dtype = _dtype(dtype, device.startswith("cuda"))
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device, dtype


def _start(device: str, out: Console, what: str):
    """Said once every option has passed its checks, before the work starts."""
    if device == "cpu":
        out.print(f"[yellow]No GPU: the kernels run in Triton's CPU interpreter ({what}).[/yellow]")
    if not out.is_terminal:  # transformers' own progress bars would fill a log with carriage returns
        from transformers.utils import logging

        logging.disable_progress_bar()


def _dtype(dtype: str | None, on_gpu: bool) -> str:
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    if dtype == "bf16" and not on_gpu:
        raise UsageError("--dtype bf16 needs a GPU: Triton's CPU interpreter cannot run bf16 dots; use fp32 or fp16")
    return dtype


def _write_json(data: dict, path: str | None):
    if path == "-":
        typer.echo(json.dumps(data, indent=2))
    elif path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def _key_value_table(title: str, rows) -> Table:
    table = Table(title=title, show_header=False, box=box.SIMPLE)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_table(out: Console, header, body, title=None, caption=None, notes=()):
    """Rows of a benchmark: right-justified columns, no box, every cell escaped; then `notes` (what a cell's word
    stands for), a line each."""
    table = Table(title=title, caption=caption, box=None, padding=(0, 1), pad_edge=False)
    for h in header:
        table.add_column(h, justify="right", overflow="fold")
    for cells in body:
        table.add_row(*(escape(c) for c in cells))
    out.print(table)
    for note in notes:
        out.print(escape(note), highlight=False)


def _not_served(report, out: Console):
    """A model flashpatch leaves as it is: say why, exit 3, before any long work."""
    out.print(_key_value_table("flashpatch does not serve this model", [
        ("model", f"{report.model_class} ({report.architecture})"),
        *[("not served", escape(reason)) for reason in report.reasons],
        ("verdict", "[bold yellow]NOT SERVED[/bold yellow]")]))


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Versions, the GPU found, and which kernel path serves it (or the fallback and why)."""
    from flashpatch.info import gather_info

    data = gather_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [(name, version or "not installed") for name, version in data["versions"].items()]
    rows.append(("device", data["device"]))
    rows += [(f"gpu {key}", str(value)) for key, value in (data["gpu"] or {}).items()]
    for label, path in (("apply() here", data["kernel_path"]), ("verify / bench", data["cli_kernel_path"])):
        rows.append((label, f"[bold]{path['name']}[/bold]: {path['reason']}"))
    if "autotune" in data:
        tune = data["autotune"]
        rows.append(("autotune", f"{'on' if tune['enabled'] else 'off'} ({tune['switch']}); cache {tune['cache']}"))

    def fmt(cfg):
        return "  ".join(f"{k}={v}" for k, v in cfg.items())

    for bucket, cfg in data["tiles"].items():
        rows.append((f"tiles {bucket}", fmt(cfg)))
        rows += [("  autotune candidate", fmt(alt)) for alt in data["tune_candidates"].get(bucket, [])]
    for bucket, cfg in data["backward_tiles"].items():
        rows.append((f"backward tiles {bucket}", f"dK/dV: {fmt(cfg['dkdv'])} | dQ: {fmt(cfg['dq'])}"))
    rows += [(f"decode tiles {bucket}", fmt(cfg)) for bucket, cfg in data["decode_tiles"].items()]
    rows += [(f"fp8 tiles {d}", "\n".join(fmt(c) for c in cands)) for d, cands in data.get("fp8_tiles", {}).items()]
    if "sm90_gluon" in data:
        gluon = data["sm90_gluon"]
        rows.append(("gluon sm90 forward", f"{'available' if gluon['available'] else 'unavailable'} ({gluon['switch']})"))
        rows += [(f"  candidates {d}", ", ".join(labels)) for d, labels in gluon["candidates"].items()]
    console.print(_key_value_table("flashpatch info", rows))


@app.command(epilog=EXIT_HELP)
def verify(
    model: str = typer.Argument(..., help=MODEL_HELP),
    text: str = typer.Option(None, "--text", help="Local UTF-8 text file (default: WikiText-2 test from the hub)."),
    dataset: str = typer.Option(None, "--dataset", help="Hub dataset as name[:config[:split]] with a text column."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Use only the first N tokens, N >= 2 "
                                                              "(CPU default 512; GPU default: all)."),
    context: int = typer.Option(None, "--context", help="Window length in tokens, >= 2 (GPU default 2048, CPU 128; "
                                                        "at most the model's positions)."),
    stride: int = typer.Option(None, "--stride", help="Window stride, 1..context (default context/2 on GPU, "
                                                      "context on CPU)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (GPU default bf16, CPU fp32)."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda if present)."),
    device_map: str = typer.Option(None, "--device-map", help="'auto': spread the model's layers over every "
                                                            "visible GPU (accelerate), as for models too big for one."),
    generate_tokens: int = typer.Option(None, "--generate-tokens", help="Greedy tokens compared (GPU 128, CPU 16; "
                                                                        "0 skips the comparison)."),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Allowed relative perplexity difference, percent."),
    min_top1: float = typer.Option(None, "--min-top1", help="Also require this top-1 agreement of logits (0-1)."),
    layers: int = typer.Option(None, "--layers", help="Keep only the first K transformer blocks (faster checks)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a hub model's own Python "
                                                                              "code (transformers' flag)."),
    json_path: str = typer.Option(None, "--json", help="Also write the result as JSON to this file ('-': stdout)."),
):
    """Perplexity, logit and generation parity of MODEL, unpatched vs patched, on the same text."""
    out = err_console if json_path == "-" else console  # stdout carries the JSON alone
    with _usage_errors():
        _check_model_options(model, layers, device_map)
        output_file("--json", json_path)
        device, dtype = _choose_device(device, dtype)
        on_gpu = device.startswith("cuda")
        from flashpatch.verify import VerifyOptions

        context = context if context is not None else (2048 if on_gpu else 128)
        opts = VerifyOptions(context=context, stride=stride if stride is not None else (context // 2 if on_gpu else context),
                             max_tokens=max_tokens if max_tokens is not None or on_gpu else 512, tolerance_pct=tolerance,
                             min_top1=min_top1, generate_tokens=generate_tokens if generate_tokens is not None
                             else (128 if on_gpu else 16))
        opts.check()
        _start(device, out, "slow: a correctness check, not a speed test")
        from flashpatch.loading import DTYPES, load_model, load_text
        from flashpatch.verify import EXIT_CODES, not_served_result, run_verify, serving_report, text_tokens

        text_data, source = load_text(text, dataset)
        with out.status(f"loading {model}"):
            loaded = load_model(model, dtype=DTYPES[dtype], device=device, layers=layers,
                                trust_remote_code=trust_remote_code, device_map=device_map)
        tokens = text_tokens(loaded, text_data, opts)
    shortened = opts.fit_positions(loaded.model.config)
    if shortened:
        out.print(f"[yellow]{shortened}[/yellow]")
    report = serving_report(loaded.model)
    if not report.patched:
        _not_served(report, out)
        _write_json(not_served_result(loaded, report, source, opts), json_path)
        raise typer.Exit(EXIT_CODES["NOT SERVED"])
    with _progress("verify: windows, unpatched then patched", None, out) as update:
        result = run_verify(loaded, tokens, source, opts, progress=lambda done, total: update(done, total))
    if json_path != "-":
        _print_verify(result)
    _write_json(result.to_dict(), json_path)
    raise typer.Exit(EXIT_CODES[result.verdict])


def _check_model_options(model: str, layers: int | None, device_map: str | None):
    from flashpatch.loading import check_model_needs

    at_least("--layers", layers, 1)
    check_model_needs(model, device_map=device_map)


def _print_verify(result):
    generation = ("skipped" if not result.generate_tokens else "identical" if result.generation_identical
                  else f"diverge at token {result.first_divergence}")
    top1 = f"{result.top1_agreement:.4%}"
    if result.min_top1 is not None:
        top1 += f" (required {result.min_top1:.4%})"
    rows = [
        ("model", escape(result.model)),
        ("text", f"{result.text_source} ({result.tokens} tokens, {result.windows} windows of {result.context}, "
                 f"stride {result.stride})"),
        ("dtype / device", f"{result.dtype} / {result.device}"),
        ("baseline attention", result.baseline_impl),
        ("patched with", f"{result.kernel_path}, {result.layers_patched} attention layers"),
        ("perplexity baseline", f"{result.ppl_baseline:.4f}"), ("perplexity patched", f"{result.ppl_patched:.4f}"),
        ("relative difference", f"{result.ppl_rel_diff_pct:.4f} % (tolerance {result.tolerance_pct} %)"),
        ("max |logit diff|", f"{result.max_abs_logit_diff:.3g}"),
        ("mean |logit diff|", f"{result.mean_abs_logit_diff:.3g}"),
        ("top-1 agreement", top1),
        (f"greedy {result.generate_tokens} tokens", generation),
        ("time baseline / patched", f"{result.seconds_baseline:.2f} s / {result.seconds_patched:.2f} s"),
    ]
    rows += [("fell back", escape(f"{count} calls ran the model's own attention: {reason}"))
             for reason, count in result.fallbacks.items()]
    rows += [("failed", escape(failure)) for failure in result.failures]
    colour = {"PASS": "green", "FAIL": "red", "NOT SERVED": "yellow"}[result.verdict]
    rows.append(("verdict", f"[bold {colour}]{result.verdict}[/bold {colour}]"))
    console.print(_key_value_table("flashpatch verify", rows))


BENCH_EXIT_HELP = ("Exit 0 when the run finished (a cell that failed, OOM say, is recorded in it), 2 bad usage, "
                   "3 NOT SERVED (flashpatch left the model as it is, or some of its calls would have fallen back).")


class _BenchCommand(TyperCommand):
    """`flashpatch bench`; `flashpatch bench train ...` hands everything after `train` to the training benchmark's
    own command (its options differ), as MODEL 'kernels' runs the op's tables."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "train":
            train = typer.main.get_command(bench_train_app)
            return train.make_context(f"{info_name} train", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@app.command(cls=_BenchCommand, epilog=BENCH_EXIT_HELP)
def bench(
    model: str = typer.Argument(None, help="As in verify, or "
                                           "'kernels' to benchmark the op itself. Default: the llama2-7b preset on a "
                                           "GPU, tiny-llama without one. `flashpatch bench train --help`: "
                                           "fine-tuning steps."),
    contexts: str = typer.Option(None, "--contexts", help="Comma-separated prompt lengths, every prompt of a batch "
                                                          "that long (GPU default 512,1024,2048,4096,8192,16384)."),
    lengths: str = typer.Option(None, "--lengths", help="Instead of --contexts: batches of mixed-length prompts, "
                                                        "each length drawn uniformly from the integers LO-HI (e.g. "
                                                        "512-4096; seeded by --seed), random tokens, left-padded."),
    prompts: str = typer.Option(None, "--prompts", help="Instead of --contexts: batches of real prompts from a UTF-8 "
                                                        "text file, one prompt per line, tokenized with the model's "
                                                        "tokenizer (a preset's: UTF-8 bytes); each batch draws "
                                                        "--batch of them (seeded by --seed), left-padded."),
    seed: int = typer.Option(None, "--seed", help="With --lengths or --prompts: seed of the batches' draws "
                                                  "(default 0)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="Greedy tokens generated per prompt (GPU 128, CPU 8)."),
    batch: int = typer.Option(None, "--batch", help="Prompts per generate call (default 1; 8 with --lengths or "
                                                    "--prompts)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (GPU default bf16, CPU fp32)."),
    baselines: str = typer.Option("eager,sdpa", "--baselines", help="transformers attention implementations to "
                                                                    "compare (eager, sdpa, flash_attention_2, ...)."),
    repeats: int = typer.Option(2, "--repeats", help="Timed runs per cell (median)."),
    regimes: str = typer.Option("cold,warm", "--regimes", help="cold (unseen lengths), warm (repeated call)."),
    cache: str = typer.Option("dynamic", "--cache", help="dynamic (transformers' default) or static (StaticCache of "
                                                         "context + new tokens; generate compiles it on a GPU)."),
    layers: int = typer.Option(None, "--layers", help="Keep only the first K transformer blocks."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda if present)."),
    device_map: str = typer.Option(None, "--device-map", help="'auto': spread the model's layers over every "
                                                            "visible GPU (accelerate), as for models too big for one."),
    json_path: str = typer.Option(None, "--json", help="Write rows as JSON to this file ('-': stdout)."),
    plot_path: str = typer.Option(None, "--plot", help="Write a PNG: tokens/s and peak memory vs context."),
    head_dims: str = typer.Option("64,128", "--head-dims", help="bench kernels: head dims."),
    tables: str = typer.Option(None, "--tables", help="bench kernels: which tables, comma-separated (forward, "
                                                      "fwd-bwd, backward, decode; default all)."),
):
    """Generation tokens/sec and memory, baselines vs flashpatch: by context (--contexts), or over batches of
    mixed-length, left-padded prompts (--lengths, --prompts). Also `bench train` (fine-tuning steps) and
    `bench kernels`."""
    out = err_console if json_path == "-" else console
    batched = lengths is not None or prompts is not None
    with _usage_errors():
        output_file("--json", json_path)
        if model == "kernels":
            if batched or seed is not None:
                raise UsageError("--lengths, --prompts and --seed choose generation prompts; bench kernels times the "
                                 "op at --contexts")
            return _bench_kernels(contexts, head_dims, tables, json_path, out)
        if tables is not None:
            raise UsageError("--tables picks bench kernels' tables; generation benchmarks have one table")
        from flashpatch.bench.batched import batched_workload

        workload = batched_workload(contexts, lengths, prompts, seed, plot_path) if batched else None
        if seed is not None and not batched:
            raise UsageError(f"--seed {seed}: it seeds the batches of --lengths or --prompts; --contexts runs draw "
                             "nothing")
        output_file("--plot", plot_path)
        if plot_path:
            need_module("matplotlib", "--plot", "pip install 'flashpatch[plot]'")
        if model is not None:
            _check_model_options(model, layers, device_map)
        for option, value in (("--new-tokens", new_tokens), ("--batch", batch), ("--repeats", repeats)):
            at_least(option, value, 1)
        batch = batch or (8 if batched else 1)
        regime_list = name_list("--regimes", regimes, ("cold", "warm"))
        name_list("--cache", cache, ("dynamic", "static"))
        device, dtype = _choose_device(device, dtype)
        on_gpu = device.startswith("cuda")
        model = model or ("llama2-7b" if on_gpu else "tiny-llama")
        new_tokens = new_tokens or (128 if on_gpu else 8)
        if not batched:
            context_list = int_list("--contexts", contexts or ("512,1024,2048,4096,8192,16384" if on_gpu else "32,64"))
        from flashpatch.bench.generate import (attention_names, bench_generation, markdown, plot, positions_needed,
                                               terminal_table)
        from flashpatch.bench.switch import any_not_served, error_notes

        baseline_list = tuple(name_list("--baselines", baselines, attention_names()))
        if batched:
            return _bench_batched(model, workload, out, new_tokens=new_tokens, batch=batch, dtype=dtype, device=device,
                                  baselines=baseline_list, repeats=repeats, regimes=regime_list, cache=cache,
                                  layers=layers, device_map=device_map, json_path=json_path)
        _start(device, out, "speed on a CPU says nothing about flash kernels: this run exercises the benchmark")
        from flashpatch.loading import DTYPES, load_model
        from flashpatch.verify import EXIT_CODES, serving_report

        with out.status(f"building {model}"):
            loaded_model = load_model(model, dtype=DTYPES[dtype], device=device, layers=layers, device_map=device_map,
                                      max_positions=positions_needed(context_list, repeats, new_tokens)).model
    report = serving_report(loaded_model)
    if not report.patched:
        _not_served(report, out)
        raise typer.Exit(EXIT_CODES["NOT SERVED"])
    cells = len(context_list) * len(regime_list) * (len(baseline_list) + 1)

    def save(rows, partial=False):  # after every context too: a long run may be cut off
        if json_path != "-" or not partial:
            _write_json({"model": model, "dtype": dtype, "batch": batch, "new_tokens": new_tokens, "cache": cache,
                         "partial": partial, "rows": [r.to_dict() for r in rows],
                         "markdown": markdown(rows, baseline_list)}, json_path)

    with _progress(f"bench {model}: {cells} cells", cells, out) as update:
        rows = bench_generation(loaded_model, contexts=context_list, new_tokens=new_tokens, batch=batch,
                                baselines=baseline_list, repeats=repeats, regimes=regime_list, cache=cache,
                                progress=update, on_context=lambda so_far: save(so_far, partial=True))
    _print_table(out, *terminal_table(rows, baseline_list),
                 title=f"flashpatch bench: {model}, {dtype}, batch {batch}, {new_tokens} new tokens, {cache} cache",
                 caption="cold = unseen prompt lengths, warm = the same call repeated; x = flashpatch's speedup "
                         "over the row (median of per-repeat ratios); decode in tokens/s",
                 notes=error_notes(rows))
    save(rows)
    if plot_path:
        plot(rows, plot_path, f"{model} ({dtype}, batch {batch}, {new_tokens} new tokens, {cache} cache)")
    if any_not_served(rows):
        out.print("[yellow]NOT SERVED: some flashpatch cells would have run the model's own attention; they were "
                  "not timed.[/yellow]")
        raise typer.Exit(EXIT_CODES["NOT SERVED"])


def _bench_batched(spec: str, workload, out: Console, *, new_tokens, batch, dtype, device, baselines, repeats,
                   regimes, cache, layers, device_map, json_path):
    """`bench MODEL --lengths LO-HI | --prompts FILE`: batches of mixed-length, left-padded prompts."""
    from flashpatch.bench.batched import batch_plan, plan_lines
    from flashpatch.bench.generate import batch_markdown, batch_table, bench_batched_generation
    from flashpatch.bench.switch import any_not_served, error_notes
    from flashpatch.loading import DTYPES, load_model
    from flashpatch.verify import EXIT_CODES, serving_report

    with _usage_errors():
        _start(device, out, "speed on a CPU says nothing about flash kernels: this run exercises the benchmark")
        with out.status(f"building {spec}"):
            loaded = load_model(spec, dtype=DTYPES[dtype], device=device, layers=layers, device_map=device_map,
                                max_positions=workload.longest() + new_tokens + 1)
        plan = batch_plan(spec, loaded, workload, batch=batch, new_tokens=new_tokens, repeats=repeats,
                          regimes=regimes)
    report = serving_report(loaded.model)
    if not report.patched:
        _not_served(report, out)
        raise typer.Exit(EXIT_CODES["NOT SERVED"])
    for line in plan_lines(plan):
        out.print(line, highlight=False)
    cells = len(regimes) * (len(baselines) + 1)

    def save(rows, agreement=None, partial=False):  # after every regime too: a long run may be cut off
        if json_path != "-" or not partial:
            _write_json({"model": spec, "dtype": dtype, "batch": batch, "new_tokens": new_tokens, "cache": cache,
                         "workload": plan.to_dict(), "partial": partial, "rows": [r.to_dict() for r in rows],
                         "agreement": agreement, "markdown": batch_markdown(rows, baselines)}, json_path)

    with _progress(f"bench {spec}: {cells} cells", cells, out) as update:
        rows, agreement = bench_batched_generation(loaded.model, plan, new_tokens=new_tokens, baselines=baselines,
                                                   regimes=regimes, cache=cache, progress=update,
                                                   on_regime=lambda so_far: save(so_far, partial=True))
    _print_table(out, *batch_table(rows, baselines),
                 title=f"flashpatch bench: {spec}, {dtype}, batches of {batch} mixed-length prompts, {new_tokens} "
                       f"new tokens, {cache} cache",
                 caption="cold = fresh batches of unseen padded lengths, warm = one batch repeated; tok/s = real "
                         "new tokens per second; x = flashpatch's speedup over the row (median of per-run ratios); "
                         "prefill (real prompt tokens) and decode in tokens/s", notes=error_notes(rows))
    _print_agreement(agreement, plan, out)
    save(rows, agreement)
    if any_not_served(rows):
        out.print("[yellow]NOT SERVED: some flashpatch cells would have run the model's own attention; they were "
                  "not timed.[/yellow]")
        raise typer.Exit(EXIT_CODES["NOT SERVED"])


def _print_agreement(agreement: dict, plan, out: Console):
    """The teacher-forced agreement: its summary line and, when implementations were compared, their table."""
    from flashpatch.bench.batched import agreement_summary, agreement_table

    out.print(escape(agreement_summary(agreement, plan)), highlight=False)
    table = agreement_table(agreement)
    if table is not None:
        _print_table(out, *table)


bench_train_app = typer.Typer(add_completion=False)


@bench_train_app.command(epilog=BENCH_EXIT_HELP)
def bench_train(
    model: str = typer.Argument(None, help=f"As in bench: a preset ({PRESETS}: random weights from real "
                                           "configs), 'smollm2', a .gguf file, a local folder or a hub id. Default: "
                                           "llama2-7b on a GPU, tiny-llama without one."),
    tokens: int = typer.Option(None, "--tokens", help="Real (non-pad) tokens per step, >= 2 (GPU 16384, CPU 256)."),
    lengths: str = typer.Option(None, "--lengths", help="Sequence lengths, drawn uniformly from the integers LO-HI "
                                                        "until they hold --tokens, the last one cut to fit (GPU "
                                                        "128-4096, CPU 16-64)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sequences' lengths and tokens."),
    layouts: str = typer.Option("padded,packed", "--layouts", help="padded (a right-padded batch with its attention "
                                                                   "mask, labels -100 on the pads) and/or packed (one "
                                                                   "row, position_ids restarting at each sequence, no "
                                                                   "mask: DataCollatorWithFlattening's batch)."),
    steps: int = typer.Option(None, "--steps", help="Timed steps per cell after one warm-up step, median reported "
                                                    "(GPU 3, CPU 1)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (GPU default bf16, CPU fp32)."),
    baselines: str = typer.Option("eager,sdpa", "--baselines", help="transformers attention implementations to "
                                                                    "compare (eager, sdpa, flash_attention_2, ...)."),
    layers: int = typer.Option(None, "--layers", help="Keep only the first K transformer blocks."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda if present)."),
    json_path: str = typer.Option(None, "--json", help="Write rows as JSON to this file ('-': stdout)."),
):
    """Fine-tuning steps (forward, backward, AdamW) over mixed-length sequences, padded and packed: real tokens/s,
    step time, peak memory and each implementation's loss, baselines vs flashpatch."""
    from flashpatch.usage import length_range

    out = err_console if json_path == "-" else console
    with _usage_errors():
        output_file("--json", json_path)
        if model is not None:
            _check_model_options(model, layers, None)
        at_least("--tokens", tokens, 2)
        at_least("--steps", steps, 1)
        at_least("--seed", seed, 0)
        layout_list = name_list("--layouts", layouts, ("padded", "packed"))
        if not layout_list:
            raise UsageError(f"--layouts {layouts!r}: give padded, packed or both")
        device, dtype = _choose_device(device, dtype)
        on_gpu = device.startswith("cuda")
        low, high = length_range("--lengths", lengths or ("128-4096" if on_gpu else "16-64"), minimum=2)
        tokens = tokens or (16384 if on_gpu else 256)
        steps = steps or (3 if on_gpu else 1)
        model = model or ("llama2-7b" if on_gpu else "tiny-llama")
        from flashpatch.bench.generate import attention_names
        from flashpatch.bench.switch import any_not_served, error_notes
        from flashpatch.bench.train import (bench_layouts, draw_lengths, layout_markdown, layout_table,
                                            loss_agreement, loss_agreement_lines, random_sequences)

        baseline_list = tuple(name_list("--baselines", baselines, attention_names()))
        _start(device, out, "speed on a CPU says nothing about flash kernels: this run exercises the benchmark")
        from flashpatch.loading import DTYPES, PRESET_CONFIGS, load_model
        from flashpatch.verify import EXIT_CODES, serving_report

        with out.status(f"building {model}"):
            loaded_model = load_model(model, dtype=DTYPES[dtype], device=device, layers=layers,
                                      max_positions=high).model
        limit = (getattr(loaded_model.config, "max_position_embeddings", None)
                 or getattr(loaded_model.config, "n_positions", None))
        if model not in PRESET_CONFIGS and limit and high > limit:
            raise UsageError(f"--lengths {low}-{high}: past the model's {limit} positions")
    report = serving_report(loaded_model)
    if not report.patched:
        _not_served(report, out)
        raise typer.Exit(EXIT_CODES["NOT SERVED"])
    sequence_lengths = draw_lengths(tokens, low, high, seed)
    sequences = random_sequences(sequence_lengths, loaded_model.config.vocab_size, seed)
    out.print(f"sequences: {len(sequences)} of lengths uniform over the integers [{low}, {high}], seed {seed}, "
              f"{tokens} tokens: {' '.join(map(str, sequence_lengths))}", highlight=False)
    cells = len(layout_list) * (len(baseline_list) + 1)
    with _progress(f"bench train {model}: {cells} cells", cells, out) as update:
        rows = bench_layouts(loaded_model, sequences, layouts=layout_list, baselines=baseline_list, steps=steps,
                             seed=seed, progress=update)
    _print_table(out, *layout_table(rows, baseline_list),
                 title=f"flashpatch bench train: {model}, {dtype}, {len(sequences)} sequences, {tokens} tokens a "
                       f"step, AdamW, {steps} timed step{'' if steps == 1 else 's'}",
                 caption="tok/s = real (non-pad) tokens per second of forward + backward + optimizer step; x = "
                         "flashpatch's speedup over the row; loss = the first step's, every implementation from "
                         "the same weights",
                 notes=error_notes(rows))
    agreement = loss_agreement(rows, baseline_list[0] if baseline_list else None)
    for line in loss_agreement_lines(agreement):
        out.print(line, highlight=False)
    _write_json({"model": model, "dtype": dtype, "tokens": tokens, "lengths": [low, high], "seed": seed,
                 "sequence_lengths": sequence_lengths, "steps": steps, "layouts": layout_list,
                 "rows": [r.to_dict() for r in rows], "loss_agreement": agreement,
                 "markdown": layout_markdown(rows, baseline_list)}, json_path)
    if any_not_served(rows):
        out.print("[yellow]NOT SERVED: some flashpatch cells would have run the model's own attention.[/yellow]")
        raise typer.Exit(EXIT_CODES["NOT SERVED"])


def _bench_kernels(lengths: str | None, head_dims: str, tables: str | None, json_path: str | None, out: Console):
    import torch

    from flashpatch.bench.kernels import KERNEL_TABLES

    length_list = int_list("--contexts", lengths) if lengths else None
    dims = int_list("--head-dims", head_dims, minimum=8)
    if any(d % 8 or d > 256 for d in dims):
        raise UsageError(f"--head-dims {head_dims!r}: multiples of 8 up to 256")
    picked = KERNEL_TABLES if tables is None else tuple(t.strip() for t in tables.split(",") if t.strip())
    unknown = [t for t in picked if t not in KERNEL_TABLES]
    if unknown or not picked:
        raise UsageError(f"--tables {tables!r}: a comma-separated choice of {', '.join(KERNEL_TABLES)}")
    if not torch.cuda.is_available():
        raise UsageError("bench kernels needs a CUDA GPU (the CPU interpreter's speed means nothing)")
    from flashpatch.bench.kernels import run_kernel_tables

    def on_table(title, text, data):  # each table as it is done, and the JSON so far: a cut-short run keeps both
        out.print(title)
        out.print(text)
        if json_path != "-":
            _write_json(data, json_path)

    with _progress("forward, backward and decode kernels", None, out) as update:
        _, data = run_kernel_tables(length_list, dims, progress=update, on_table=on_table, tables=picked)
    if json_path == "-":
        _write_json(data, json_path)


if __name__ == "__main__":
    app()
