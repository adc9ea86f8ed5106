"""The `sidetune` command line: a thin typer layer over the `sidetune` library."""
