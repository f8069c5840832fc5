"""The `flashpatch` command line: typer commands that call into flashpatch, no logic of their own."""
