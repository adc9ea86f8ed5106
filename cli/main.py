"""The typer app. Each command parses options, calls the library and renders the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.progress import RichProgress, console
from sidetune.errors import SidetuneError

app = typer.Typer(
    name="sidetune",
    help="Cache a frozen backbone's per-layer features once; train many side networks from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@app.command()
def extract(
    model: str = typer.Option(..., help="Alias (vit_b16, vit_l16, vit_h14, vit_g14, vit_s16, vit_ti16), any timm ViT name, or local-dir:/folder."),
    dataset: str = typer.Option(..., help="VTAB-1k task name, digits, hf:org/name, or a folder (VTAB-1k lists, class folders, save_to_disk)."),
    out: Optional[Path] = typer.Option(None, help="Cache folder. Default: ./cache/<dataset>."),
    spec: str = typer.Option("default", help="Cache spec name (cache_specs/NAME.yaml) or path to a YAML spec."),
    splits: Optional[str] = typer.Option(None, help="Comma-separated splits to extract. Default: all the dataset has."),
    data_root: Optional[Path] = typer.Option(None, envvar="SIDETUNE_DATA", help="Folder holding VTAB-1k task folders."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights file: .safetensors, .pth/.bin, or the original .npz."),
    pretrained: bool = typer.Option(True, help="Load pretrained weights (from the hub unless --weights is given)."),
    preprocess: str = typer.Option("vtab", help="vtab (resize, bicubic, ImageNet mean/std), timm (the model's eval transform), inception (0.5/0.5)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, min=0, help="Image-loading worker processes. Default: by device."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of each split (a quick trial)."),
    overwrite: bool = typer.Option(False, help="Delete an existing cache at --out first."),
) -> None:
    """Stage one: run the frozen backbone over a dataset once and write its feature cache."""
    import sidetune
    from sidetune.extract import default_cache_path

    with RichProgress() as progress:
        reports = sidetune.extract(
            model, dataset, out, spec=spec, splits=_split_list(splits), data_root=data_root,
            weights=weights, pretrained=pretrained, preprocess=preprocess, device=device,
            precision=precision, batch_size=batch_size, workers=workers, limit=limit,
            overwrite=overwrite, progress=progress, log=lambda message: console.print(f"[dim]{message}"),
        )
    out = out or default_cache_path(dataset)
    incomplete = [r.name for r in reports if not r.complete]
    if incomplete:
        raise SidetuneError(f"Splits {', '.join(incomplete)} of {out} are incomplete; rerun the same command to finish them.")
    console.print(f"[green]Cache ready:[/] {out}")
    show_info(out)


@app.command()
def info(
    cache: Path = typer.Argument(..., help="A cache folder written by `sidetune extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print the full manifest as JSON."),
) -> None:
    """Describe a cache: backbone, preprocessing, splits with sizes, shapes, bytes and completion."""
    if as_json:
        import sidetune

        typer.echo(json.dumps(sidetune.open_cache(cache).manifest, indent=2))
        return
    show_info(cache)


def show_info(path: Path) -> None:
    import sidetune

    cache = sidetune.open_cache(path)
    manifest = cache.manifest
    backbone, pre, layout, data = manifest["backbone"], manifest["preprocessing"], manifest["layout"], manifest["dataset"]
    name = f"{backbone['alias']} ({backbone['timm_name']})" if backbone["alias"] else backbone["timm_name"]
    console.print(f"[bold]{path}[/]  format v{manifest['format_version']}, created {manifest['created']}")
    console.print(f"backbone       {name}, {backbone['depth']} blocks, width {backbone['width']}, weights {backbone['weights_source']} sha256 {backbone['weights_sha256'][:12]}")
    console.print(f"preprocessing  {pre['name']}: {pre['size'][0]}x{pre['size'][1]} {pre['interpolation']}, mean {pre['mean']}, std {pre['std']}"
                  + (f", crop_pct {pre['crop_pct']}" if pre.get("crop_pct") else ""))
    console.print(f"dataset        {data['name']} ({data['source']}), {data['num_classes']} classes"
                  + (f", VTAB-1k {data['vtab_group']}" if data.get("vtab_group") else ""))
    console.print(f"layout         stages {layout['stages']}, {layout['num_tokens']} tokens ({layout['token_selection']}), "
                  f"{manifest['spec']['dtype']}, spec '{manifest['spec']['name']}', compute {manifest['compute']['precision']}")
    for note in data.get("notes", []):
        console.print(f"[yellow]note[/]           {note}")
    table = Table("split", "images", "shape (N, S, T, D)", "on disk", "shards", "max |x|", "state")
    for split in cache.splits.values():
        absmax = split.record.get("absmax")
        table.add_row(
            split.name, f"{split.num_images:,}", str(tuple(split.tokens.shape)), _human_bytes(split.nbytes_stored),
            f"{split.shards_done}/{split.record['num_shards']}", f"{max(absmax):.4g}" if absmax else "-",
            "[green]complete" if split.complete else "[yellow]incomplete",
        )
    console.print(table)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return str(count)


@app.command()
def demo(
    out: Path = typer.Option(Path("cache/digits"), help="Where to write the demo cache."),
    model: str = typer.Option("test_vit", help="A small timm ViT, randomly initialised."),
) -> None:
    """Offline end-to-end run: scikit-learn's digits through a small random timm ViT into a cache."""
    extract(model=model, dataset="digits", out=out, spec="default", splits=None, data_root=None,
            weights=None, pretrained=False, preprocess="vtab", device="auto", precision="auto",
            batch_size=64, workers=None, limit=None, overwrite=False)


@app.command()
def models() -> None:
    """List the backbone aliases."""
    from sidetune.backbones import ALIASES

    table = Table("alias", "timm model")
    for alias, name in ALIASES.items():
        table.add_row(alias, name)
    console.print(table)


@app.command()
def datasets() -> None:
    """List the VTAB-1k catalogue and the bundled datasets."""
    from sidetune.datasets import VTAB_TASKS

    table = Table("task", "group", "classes", "hub copy")
    for task in VTAB_TASKS.values():
        table.add_row(task.name, task.group, str(task.num_classes), task.hub_id or "-")
    table.add_row("digits", "bundled", "10", "scikit-learn, offline")
    console.print(table)


def main() -> None:
    """Console-script entry point: user errors print as one paragraph, exit status 2."""
    try:
        app()
    except SidetuneError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise SystemExit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished shards are kept; rerun the same command to resume.")
        raise SystemExit(130)
