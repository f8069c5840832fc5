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


if __name__ == "__main__":
    app()
