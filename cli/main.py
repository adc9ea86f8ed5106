"""The typer app. Each command parses options, calls the library and renders the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.method_options import call_with_defaults, with_method_options
from cli.progress import RichProgress, console, folding_table
from sidetune.errors import SidetuneError

app = typer.Typer(
    name="sidetune",
    help="Cache a frozen backbone's per-layer features once; train many side networks from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: each option's text wraps under it at any width, never cut
)


WIDE_TABLE = 120  # columns below which `runs` prints two lines per record instead of its table


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


@app.command(short_help="Stage one: run the backbone over a dataset once, into a cache.")
def extract(
    model: str = typer.Option(..., help="Alias (vit_b16, vit_l16, vit_h14, vit_g14, vit_s16, vit_ti16), any timm model name (ViTs block by block, other models through forward_intermediates), or local-dir:/folder."),
    dataset: str = typer.Option(..., help="VTAB-1k task name, digits, hf:org/name, or a folder (VTAB-1k lists, class folders, save_to_disk)."),
    out: Optional[str] = typer.Option(None, help="Cache folder or fsspec URL (s3://, gs://, file://). Default: ./cache/<dataset>."),
    spec: str = typer.Option("default", help="Cache spec name (cache_specs/NAME.yaml) or path to a YAML spec."),
    splits: Optional[str] = typer.Option(None, help="Comma-separated splits to cache. Default: all the dataset has, except VTAB-1k's test (evaluated live, through the backbone)."),
    data_root: Optional[Path] = typer.Option(None, envvar="SIDETUNE_DATA", help="Folder holding VTAB-1k task folders."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights file: .safetensors, .pth/.bin, or the original .npz."),
    pretrained: bool = typer.Option(True, help="Load pretrained weights (from the hub unless --weights is given)."),
    preprocess: str = typer.Option("vtab", help="vtab (resize, bicubic, ImageNet mean/std), timm (the model's eval transform), inception (0.5/0.5)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, min=0, help="Image-loading worker processes. Default: by device."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of each split (a quick trial)."),
    overwrite: bool = typer.Option(False, help="Replace an existing cache at --out (built beside it, swapped in when complete)."),
    views: int = typer.Option(0, min=0, help="Also store N augmented views of every training image (validation and test stay plain); training draws one per image per epoch."),
    view_transform: str = typer.Option("vpt", help="How views are made: vpt (resize, random crop, flip: VPT's FGVC training transform) or dinov2 (RandomResizedCrop and flip)."),
    frames: Optional[int] = typer.Option(None, min=1, help="Video datasets: frames read per clip, spread uniformly over it (default 8)."),
    frame_stride: Optional[int] = typer.Option(None, min=1, help="Video datasets: read every N-th frame from the first instead of spreading them over the clip."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (splits, images, bytes, free space) and exit."),
) -> None:
    """Stage one: run the frozen backbone over a dataset once and write its feature cache."""
    import sidetune
    from sidetune.distributed import launched_rank
    from sidetune.extract import default_cache_path, plan_extraction

    if dry_run:
        show_plan(plan_extraction(model, dataset, out, spec=spec, splits=_split_list(splits), data_root=data_root,
                                  limit=limit, views=views, frames=frames, frame_stride=frame_stride))
        return
    main_rank = launched_rank() == 0  # under torchrun only rank 0 reports
    with RichProgress(quiet=not main_rank) as progress:
        reports = sidetune.extract(
            model, dataset, out, spec=spec, splits=_split_list(splits), data_root=data_root,
            weights=weights, pretrained=pretrained, preprocess=preprocess, device=device,
            precision=precision, batch_size=batch_size, workers=workers, limit=limit,
            overwrite=overwrite, views=views, view_transform=view_transform, frames=frames,
            frame_stride=frame_stride, progress=progress,
            log=lambda message: console.print(f"[dim]{message}"), warn=_warn,
        )
    if not main_rank:
        return
    out = out or default_cache_path(dataset)
    incomplete = [r.name for r in reports if not r.complete]
    if incomplete:
        raise SidetuneError(f"Splits {', '.join(incomplete)} of {out} are incomplete; rerun the same command to finish them.")
    console.print(f"[green]Cache ready:[/] {out}")
    for report in reports:
        if report.kind == "live":
            console.print(f"[yellow]{report.name}[/]: {report.num_images:,} images kept out of the cache. train, sweep and "
                          f"evaluate run them through the backbone when they report {report.name}; to cache it too, "
                          f"pass --splits with {report.name} among the splits.")
    show_info(out)


def show_plan(plan) -> None:
    from sidetune.cache.plan import human_bytes

    table = folding_table("split", "images", "kept as", "bytes", title=f"Plan for {plan.out} (spec {plan.spec})",
                          whole=("split", "images", "bytes"))
    how = {"stored": "stored", "view": "rows of {parent}", "live": "live: through the backbone when evaluated"}
    for split in plan.splits:
        kept = how[split.kind].format(parent=split.parent) + (f", {split.views} augmented views" if split.views else "")
        table.add_row(split.name, f"{split.num_images:,}", kept, human_bytes(split.nbytes))
    table.add_row("[bold]total", "", "", f"[bold]{human_bytes(plan.nbytes)}")
    console.print(table)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    for warning in plan.warnings:
        _warn(warning)
    free = "unknown (object store)" if plan.free_bytes is None else human_bytes(plan.free_bytes)
    verdict = "[green]fits" if plan.fits else "[red]does not fit"
    console.print(f"free at {plan.out}: {free}: {verdict}")


@app.command(short_help="Describe a cache: backbone, split roles, splits, bytes, state.")
def info(
    cache: str = typer.Argument(..., help="A cache (folder or fsspec URL) written by `sidetune extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print the full manifest as JSON."),
    verify: bool = typer.Option(False, "--verify", help="Read every shard back and check it against what was written (as long as loading the cache); without it, only the files' presence and sizes are checked."),
) -> None:
    """Describe a cache: backbone, preprocessing, splits with sizes, shapes, bytes and completion;
    damage (missing, truncated or altered shards and labels) is named with its repair (exit status 2)."""
    if as_json:
        import sidetune

        typer.echo(json.dumps(sidetune.open_cache(cache).manifest, indent=2))
        return
    show_info(cache, verify=verify)


def show_info(path: str | Path, verify: bool = False) -> None:
    from rich.table import Table

    import sidetune
    from sidetune.cache.plan import human_bytes

    cache = sidetune.open_cache(path)
    info = cache.info
    backbone, pre, data = info.backbone, info.preprocessing, info.dataset
    name = f"{backbone['alias']} ({backbone['timm_name']})" if backbone["alias"] else backbone["timm_name"]
    console.print(f"[bold]{path}[/]  format v{info.format_version}, created {info.created}")
    about = Table.grid(padding=(0, 2))  # the values wrap in their own column
    about.add_column(no_wrap=True)
    about.add_column(overflow="fold")
    about.add_row("backbone", f"{name}, {backbone['depth']} {'blocks' if backbone.get('path', 'vit') == 'vit' else 'stages'}, "
                  f"width {backbone['width']}, weights {backbone['weights_source']} sha256 {backbone['weights_sha256'][:12]}")
    about.add_row("preprocessing", f"{pre['name']}: {pre['size'][0]}x{pre['size'][1]} {pre['interpolation']}, mean "
                  f"{pre['mean']}, std {pre['std']}" + (f", crop_pct {pre['crop_pct']}" if pre.get("crop_pct") else ""))
    about.add_row("dataset", f"{data['name']} ({data['source']}), {data['num_classes']} classes"
                  + (f", VTAB-1k {data['vtab_group']}" if data.get("vtab_group") else ""))
    shapes = cache.token_layout
    if shapes.uniform:
        tokens = f"{info.num_tokens} tokens x {info.width}"
    else:  # stages of different shapes (a CNN, a Swin): each stage's tokens x width
        tokens = ", ".join(f"{s.stage}: {s.num_tokens} x {s.width}" for s in shapes.shapes)
    about.add_row("layout", f"{shapes.describe_stages()}, {tokens} ({info.token_selection}), {info.spec.dtype}, "
                  f"spec '{info.spec.name}', compute {info.precision}")
    if cache.manifest.get("views"):
        views = cache.manifest["views"]
        about.add_row("views", f"{views['count']} augmented views ({views['transform']}) of every image of "
                      f"{', '.join(views['splits'])}, each seeded by the image and its index; training draws one per "
                      "image per epoch")
    about.add_row("roles", info.roles.describe() + ("" if info.carved_validation is None else
                  f" ({info.roles.val} carved from {info.carved_validation['carved_from']})"))
    for note in data.get("notes", []):
        about.add_row("[yellow]note", note)
    for warning in data.get("warnings", []):
        about.add_row("[bold yellow]warning", warning)
    console.print(about)
    axes = "(N, S, T, D)" if shapes.uniform else "(N, E)"
    table = folding_table("split", "images", "kept as", f"shape {axes}", "on disk", "max |x|", "state",
                          whole=("split", "images", "on disk", "max |x|", "state"))
    damage = cache.damage(read=verify)
    for split in cache.splits.values():
        if split.name in damage:
            state = "[red]damaged"
        elif split.kind == "stored":
            state = ("[green]complete" + (", verified" if verify else "") if split.complete else
                     f"[yellow]{split.shards_done}/{split.record['num_shards']} shards")
        else:
            state = "[green]complete" if split.complete else "[yellow]incomplete"
        if split.kind == "stored":
            absmax = split.record.get("absmax")
            kept = "stored" + (f", {split.view_count} augmented views" if split.view_count else "")
            table.add_row(split.name, f"{split.num_images:,}", kept, str(tuple(split.tokens.shape)),
                          human_bytes(split.nbytes_stored), f"{max(absmax):.4g}" if absmax else "-", state)
        elif split.kind == "view":
            table.add_row(split.name, f"{split.num_images:,}", f"rows of {split.parent.name}", "-",
                          human_bytes(split.nbytes_stored), "-", state)
        else:
            table.add_row(split.name, f"{split.num_images:,}", "live (through the backbone)", "-", "-", "-",
                          state if split.name in damage else "-")
    console.print(table)
    if damage:
        raise SidetuneError(" ".join(damage.values()))


@app.command(short_help="Stage two: train one side network from a cache.")
@with_method_options("train")
def train(
    cache: str = typer.Option(..., help="A cache (folder or fsspec URL) written by `sidetune extract`."),
    method: str = typer.Option("last", help="Side network: last, losa, mist, lst (ladder side-tuning), linear, ridge (closed form: --wd is its L2 strength), knn (weighted k-NN, no training), attentive, head2toe or restuning (Res-Tuning-Bypass)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs. Default: the method's (`sidetune methods`)."),
    lr: Optional[float] = typer.Option(None, min=0, help="Peak learning rate. Default: the method's (`sidetune methods`)."),
    wd: Optional[float] = typer.Option(None, min=0, help="AdamW weight decay (never on norms and biases); ridge's L2 strength. Default: the method's (`sidetune methods`)."),
    warmup_epochs: Optional[int] = typer.Option(None, min=0, help="Linear warmup epochs before the cosine decay. Default: a tenth of --epochs."),
    batch_size: int = typer.Option(64, min=1, help="Images per step."),
    label_smoothing: float = typer.Option(0.0, min=0, max=1, help="Label smoothing."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    data_seed: int = typer.Option(0, help="Batch-order seed (and augmentation draws)."),
    augment: str = typer.Option("none", help="Feature-space augmentation of training batches: none, or frofa-brightness (c²FroFA: per-channel brightness on min-max-mapped patch tokens; docs/methods.md)."),
    augment_magnitude: float = typer.Option(0.5, help="frofa-brightness: factors 1 + v, v uniform in [-m, m]."),
    views: Optional[int] = typer.Option(None, min=0, help="Draw each training image's view per epoch from the first N augmented views the cache stores (extract --views). Default: all it stores; 0: the images as they are."),
    train_split: Optional[str] = typer.Option(None, help="Default: train and validation together (train800val200, trainval), else train."),
    eval_split: Optional[str] = typer.Option(None, help="Default: test (without one, the validation split)."),
    eval_every: int = typer.Option(0, min=0, help="Also evaluate every N epochs and keep the best state (best.safetensors)."),
    out: Optional[Path] = typer.Option(None, help="Run directory. Default: runs/<cache>-<method>-<timestamp>."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    memory_budget: Optional[float] = typer.Option(None, min=0, help="GiB a split may take on the device before it is streamed by shard. Default: half the free memory."),
    compile: bool = typer.Option(False, "--compile", help="Run the side network through torch.compile (fused kernels; compiles once per shape first)."),
    fused: bool = typer.Option(False, "--fused", help="CUDA: run LAST's and MIST's chain of modules and the optimizer as fused Triton kernels (a few launches per step instead of ~100 per module; not yet measured on a GPU)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Capture each training step in a CUDA graph and replay it. Default: on with CUDA."),
    weights: Optional[Path] = typer.Option(None, help="A live split's evaluation: the backbone weights file, if it moved since extraction."),
    data_root: Optional[Path] = typer.Option(None, help="A live split's evaluation: where the dataset's images are now, if they moved."),
    log_to: str = typer.Option("none", "--log", help="none, or tensorboard: event files (per-config scalars, the HParams table) in the run or sweep folder's tensorboard/."),
    overwrite: bool = typer.Option(False, help="Replace a finished run (or one with other settings) at --out."),
    **options,
) -> None:
    """Stage two: train one side network from the cache into a run directory (never loads the backbone)."""
    from cli.progress import TrainProgress
    from sidetune.train import train as train_run
    from sidetune.training import TrainConfig

    fields = dict(batch_size=batch_size, label_smoothing=label_smoothing, seed=seed, data_seed=data_seed, augment=augment,
                  augment_magnitude=augment_magnitude, views=views)
    fields.update({name: value for name, value in (("lr", lr), ("epochs", epochs), ("weight_decay", wd),
                                                   ("warmup_epochs", warmup_epochs)) if value is not None})
    config = TrainConfig.create(method, options, **fields)
    budget = None if memory_budget is None else int(memory_budget * 2**30)
    import sidetune

    opened = sidetune.open_cache(cache).relocate(weights, data_root)
    with TrainProgress() as progress:
        run_dir, result = train_run(
            opened, config, out=out, train_split=train_split, eval_split=eval_split, device=device,
            eval_every=eval_every, memory_budget=budget, compile=compile, fused=fused, cuda_graphs=cuda_graphs,
            tensorboard=_tensorboard(log_to), overwrite=overwrite,
            on_start=lambda epoch: progress.add(method, config.epochs, completed=epoch), on_epoch=progress.epoch_done,
            live_progress=progress, log=lambda message: console.print(f"[dim]{message}"), warn=_warn,
        )
    show_run(run_dir)


def show_run(run_dir: Path) -> None:
    from sidetune.runs import open_run

    run = open_run(run_dir)
    metrics = run.metrics
    table = folding_table("method", "train split", "eval split", "top-1", "best (epoch)", "params", "seconds", title=str(run_dir),
                          whole=("method", "top-1", "params", "seconds"))
    best = f"{metrics['best_top1']:.2f} ({metrics['best_epoch']})" if metrics.get("best_top1") is not None else "-"
    table.add_row(metrics["method"], metrics["train_split"], metrics["eval_split"], f"{metrics['top1']:.2f}",
                  best, f"{metrics['params']:,}", f"{metrics['seconds']:.1f}")
    console.print(table)
    files = [name for name in ("metrics.json", "model.safetensors", "best.safetensors", "log.jsonl", "curve.png")
             if (run_dir / name).is_file()]
    console.print(f"[green]Run saved:[/] {run_dir} ({', '.join(files)})")


@app.command(short_help="Score a trained run on a split (a live one through the backbone).")
def evaluate(
    run: Path = typer.Option(..., help="A run directory written by `sidetune train`."),
    split: str = typer.Option("test", help="A split of the run's cache: cached, or live (run through the backbone)."),
    which: str = typer.Option("last", help="last (final epoch) or best (best on the eval split; needs --eval-every)."),
    cache: Optional[str] = typer.Option(None, help="The run's cache, if it moved since training."),
    weights: Optional[Path] = typer.Option(None, help="The backbone weights file, if it moved since extraction (live splits)."),
    data_root: Optional[Path] = typer.Option(None, help="Where the dataset's images are now, if they moved (live splits)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch."),
) -> None:
    """Score a trained run on a split of its cache; a live split goes through the backbone once."""
    from sidetune.evaluate import evaluate as evaluate_run

    if which not in ("last", "best"):
        raise SidetuneError(f"--which must be last or best, not '{which}'.")
    with RichProgress() as progress:  # a live split's images through the backbone
        record = evaluate_run(run, split, which=which, cache=cache, weights=weights, data_root=data_root,
                              device=device, batch_size=batch_size, progress=progress, warn=_warn)
    table = folding_table("run", "split", "kept as", "images", "top-1", title="evaluation",
                          whole=("split", "images", "top-1"))
    table.add_row(str(run), split, record["kind"], f"{record['images']:,}", f"{record['top1']:.2f}")
    console.print(table)
    console.print(f"Saved {run}/eval-{split}.json")


@app.command(name="runs", short_help="Every run, sweep and suite under a folder, newest first.")
def runs_command(
    folder: Path = typer.Argument(Path("runs"), help="The folder holding runs and sweeps (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """Every run, sweep and suite under a folder in one table, newest first (read from their files)."""
    from sidetune.history import list_runs

    records = list_runs(folder)
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    cells = [(r["kind"], Path(r["path"]).name, r["method"], r["data"], r["settings"], r["splits"],
              "-" if r["top1"] is None else f"{r['top1']:.2f}", "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
              (r["created"] or "-")[:16].replace("T", " ")) for r in records]
    if console.width < WIDE_TABLE:  # nine columns do not fit: two lines per record, the settings on the second
        from rich.padding import Padding

        console.print(f"[bold]{len(records)} under {folder}")
        for kind, name, method, data, settings, splits, top1, seconds, when in cells:
            console.print(f"[bold]{name}[/] {kind}, {method} on {data}, top-1 {top1}, {seconds} s, {when}")
            console.print(Padding(f"{splits}; {settings}", (0, 0, 0, 2)))
        return
    table = folding_table("kind", "folder", "method", "data", "settings", "splits", "top-1", "seconds", "when",
                          title=f"{len(records)} under {folder}", whole=("kind", "method", "top-1", "seconds", "when"))
    for row in cells:
        table.add_row(*row)
    console.print(table)


@app.command(short_help="Classify new images with a trained run.")
def predict(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = typer.Option(..., help="A run directory written by `sidetune train`."),
    which: str = typer.Option("last", help="last (final epoch) or best (best on the eval split; needs --eval-every)."),
    weights: Optional[Path] = typer.Option(None, help="The backbone weights file, if it has moved since extraction (or offline)."),
    top: int = typer.Option(3, min=1, help="Classes shown per image."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines (path, top classes, logits) instead of a table."),
) -> None:
    """Classify new images with a trained run: the cache's backbone and preprocessing, then the side network."""
    from sidetune.predict import predict as predict_images
    from sidetune.runs import open_run

    if which not in ("last", "best"):
        raise SidetuneError(f"--which must be last or best, not '{which}'.")
    predictions = predict_images(run, images, which=which, weights=weights, device=device, batch_size=batch_size)
    class_names = open_run(run).class_names
    if as_json:
        for prediction in predictions:
            typer.echo(json.dumps({"path": str(prediction.path), "top": prediction.top(class_names, top),
                                   "logits": prediction.logits.tolist()}))
        return
    table = folding_table("image", *[f"#{i + 1}" for i in range(min(top, len(class_names)))])
    for prediction in predictions:
        table.add_row(str(prediction.path), *[f"{name} ({p:.1%})" for name, p in prediction.top(class_names, top)])
    console.print(table)


@app.command(short_help="Train many configurations from a cache at once, select, report.")
@with_method_options("sweep")
def sweep(
    cache: Optional[str] = typer.Option(None, help="A cache (folder or fsspec URL) written by `sidetune extract`."),
    caches: Optional[Path] = typer.Option(None, help="Several tasks: a folder holding one cache per task (instead of --cache). With neither, the caches under ./cache."),
    tasks: str = typer.Option("all", help="With --caches: all, or comma-separated task names."),
    method: Optional[str] = typer.Option(None, help="Side network: last (default), losa, mist, lst, linear, ridge (its --wd values are L2 strengths, all solved from one eigendecomposition), knn (its --neighbors and --temperature values all scored from one similarity computation), attentive, head2toe or restuning."),
    grid: Optional[str] = typer.Option(None, help="YAML grid (method, fixed settings, and lists under 'grid'), or a shipped grid by name: dinov2-linear (DINOv2's linear protocol: 13 lrs x last 1 or 4 blocks x cls or both)."),
    lr: Optional[str] = typer.Option(None, help="Learning rates, comma-separated (e.g. 3e-4,1e-3,3e-3)."),
    wd: Optional[str] = typer.Option(None, help="Weight decays, comma-separated."),
    seed: Optional[str] = typer.Option(None, help="Initialisation seeds, comma-separated."),
    label_smoothing: Optional[str] = typer.Option(None, help="Label smoothings, comma-separated."),
    augment: Optional[str] = typer.Option(None, help="Feature-space augmentations (none, frofa-brightness), comma-separated."),
    augment_magnitude: Optional[str] = typer.Option(None, help="frofa-brightness magnitudes (default 0.5), comma-separated."),
    views: Optional[str] = typer.Option(None, help="Augmented views drawn from (the first N the cache stores; 0: none), comma-separated. Default: all it stores."),
    epochs: Optional[str] = typer.Option(None, help="Epochs (default: the method's), comma-separated."),
    warmup_epochs: Optional[str] = typer.Option(None, help="Warmup epochs (default: a tenth of the epochs)."),
    batch_size: Optional[str] = typer.Option(None, help="Batch sizes (default 64), comma-separated."),
    protocol: str = typer.Option("auto", help="val (VTAB-1k's protocol on any dataset: select on the validation split, retrain on train + validation, report test; vtab is its old name), none (rank on --eval-split, default test, said when it is test), or auto (val where the cache has those splits)."),
    top_k: int = typer.Option(1, min=1, help="Protocol val: how many selected configurations to retrain."),
    train_split: Optional[str] = typer.Option(None, help="Protocol none: training split."),
    eval_split: Optional[str] = typer.Option(None, help="Protocol none: evaluation split."),
    out: Optional[Path] = typer.Option(None, help="Sweep directory. Default: runs/<cache>-sweep-<timestamp>."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    max_stack: Optional[int] = typer.Option(None, min=1, help="At most this many configurations per stack. Default: as many as fit the device's memory (measured); at most 16 on the CPU."),
    memory_budget: Optional[float] = typer.Option(None, min=0, help="GiB a split may take on the device before it is streamed by shard."),
    compile: bool = typer.Option(False, "--compile", help="Run the side network through torch.compile (fused kernels; compiles once per shape first)."),
    fused: bool = typer.Option(False, "--fused", help="CUDA: run LAST's and MIST's chain of modules and the optimizer as fused Triton kernels (a few launches per step instead of ~100 per module; not yet measured on a GPU)."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Capture each training step in a CUDA graph and replay it. Default: on with CUDA."),
    weights: Optional[Path] = typer.Option(None, help="A live split's evaluation: the backbone weights file, if it moved since extraction."),
    data_root: Optional[Path] = typer.Option(None, help="A live split's evaluation: where the dataset's images are now, if they moved."),
    log_to: str = typer.Option("none", "--log", help="none, or tensorboard: event files (per-config scalars, the HParams table) in the run or sweep folder's tensorboard/."),
    halving: bool = typer.Option(False, "--halving", help="Successive halving while selecting: at each rung only the best 1/factor of a stack keeps training; the rest are reported as pruned."),
    halving_factor: int = typer.Option(3, min=2, help="Successive halving: keep the best 1/factor at each rung."),
    halving_min_epochs: int = typer.Option(1, min=1, help="Successive halving: epochs before the first rung (then x factor)."),
    **options,
) -> None:
    """Train many configurations from one cache at once (stacked, sharing every batch) and rank them."""
    from cli.progress import TrainProgress
    from sidetune.distributed import launched_rank
    from sidetune.sweeps import (
        Halving,
        estimate_seconds,
        find_caches,
        load_grid,
        sweep_configs,
        sweep_sources,
        sweep_tasks,
        train_command,
    )
    from sidetune.sweeps import sweep as run_sweep

    file_method, values, fixed = load_grid(grid) if grid else (None, {}, {})
    method = method or file_method or "last"
    listed = {"lr": lr, "weight_decay": wd, **options, "seed": seed, "label_smoothing": label_smoothing, "augment": augment,
              "augment_magnitude": augment_magnitude, "views": views,
              "epochs": epochs, "warmup_epochs": warmup_epochs, "batch_size": batch_size}
    for name, text in listed.items():
        if text is not None:
            values[name] = [_number(part) for part in _split_list(text)]
            fixed.pop(name, None)
    configs, defaulted = sweep_configs(method, values, fixed, from_file=grid is not None)
    grid_note = f", the default grid of {method} ({' x '.join(defaulted)}; docs/methods.md)" if defaulted else ""
    budget = None if memory_budget is None else int(memory_budget * 2**30)
    chosen_tasks = "all" if tasks == "all" else _split_list(tasks)
    cache, caches = sweep_sources(cache, caches)
    main_rank = launched_rank() == 0  # under torchrun only rank 0 reports
    if main_rank:
        import sidetune

        task_caches = [sidetune.open_cache(cache)] if cache is not None else list(find_caches(caches, chosen_tasks).values())
        first, tasks_count = task_caches[0], len(task_caches)
        seconds = estimate_seconds(first, configs, device, protocol=protocol, top_k=top_k, max_stack=max_stack,
                                   train_split=train_split, eval_split=eval_split) * tasks_count
        console.print(f"[bold]{len(configs)}[/] configurations of {method}{grid_note}, on "
                      f"{tasks_count} cache{'s' if tasks_count > 1 else ''}: about {_duration(seconds)} of training")
        if seconds > 3600 and (defaulted or epochs is None):  # the defaults chose this much work, not the user
            console.print(f"[yellow]That is long.[/] To make it shorter: fewer epochs (--epochs "
                          f"{max(1, configs[0].epochs // 4)}), successive halving (--halving), or fewer values "
                          "(e.g. --lr 1e-3 --wd 1e-4).")
    options = dict(protocol=protocol, top_k=top_k, train_split=train_split, eval_split=eval_split, device=device,
                   max_stack=max_stack, memory_budget=budget, compile=compile, fused=fused, cuda_graphs=cuda_graphs,
                   tensorboard=_tensorboard(log_to), halving=Halving(halving_factor, halving_min_epochs) if halving else None)
    with TrainProgress(quiet=not main_rank) as progress:
        callbacks = dict(on_stack=progress.stack_started, on_epoch=progress.epoch_done, live_progress=progress)
        if caches is not None:
            def announce(name: str, number: int, total: int) -> None:
                if main_rank:
                    console.print(f"[bold]{name}[/] (task {number + 1}/{total})")

            suite = sweep_tasks(caches, configs, tasks=chosen_tasks, out=out,
                                on_task=announce, **options, **callbacks)
        else:
            import sidetune

            report = run_sweep(sidetune.open_cache(cache).relocate(weights, data_root), configs, out=out,
                               **options, **callbacks)
    if not main_rank:
        return
    if caches is not None:
        print_summary(suite)
        return
    _print_sweep(report)
    if report.eval_images_seen_in_training:
        _warn(f"{report.eval_images_seen_in_training} images the configurations were scored on are in their training "
              "split: the ranking is on seen data, not a held-out score.")
    console.print("Train it alone with:")
    best = report.best  # printed unwrapped, whatever the terminal's width: a pasted line must hold all of it
    typer.echo("  " + train_command(cache, best.config, best.train_split, best.eval_split))
    if best.config_id in report.models:
        console.print(f"Its model: {report.models[best.config_id]} (`sidetune predict --run` and `evaluate --run` take it)")
    console.print(f"Results: {report.out}/results.jsonl, results.csv, sweep.png")


def _print_sweep(report) -> None:
    from sidetune.results import varying_settings

    records = [row.record() for row in report.rows]
    varying = varying_settings(records)
    table = folding_table("#", "phase", *varying, "split", "top-1", "status", "seconds", whole=("#", "phase", "split", "top-1"),
                          title=f"{report.out} (protocol {report.protocol.name}: {report.protocol.describe()})")
    for row in sorted(report.rows, key=lambda r: (r.phase != "final", -(r.top1 if r.top1 is not None else -1))):
        record = row.record()
        table.add_row(str(row.config_id), row.phase, *[str(record[k]) for k in varying], row.eval_split,
                      "-" if row.top1 is None else f"{row.top1:.2f}",
                      row.status if row.status == "ok" else f"[red]{row.status}", f"{row.seconds:.1f}")
    console.print(table)
    console.print(f"[green]Best:[/] config {report.best.config_id}, {report.best.eval_split} top-1 {report.best.top1:.2f}")
    if report.protocol.selected_on_test:
        _warn(f"the best configuration was selected on the test split ({report.protocol.select}): its top-1 is the "
              "best of the sweep on test, an optimistic estimate, not a held-out score. The default protocol selects "
              "on the validation split.")


def print_summary(suite) -> None:
    """Per task the best config's top-1 (beside the published number), then the VTAB-1k means."""
    published = suite.summary["published"]
    columns = ["task", "group", "best config", "top-1"] + (["published", "difference"] if published else [])
    table = folding_table(*columns, title=f"{suite.out}: {suite.summary['method']}, top-1 of the best config per task",
                          whole=("top-1", "published", "difference"))
    for score in suite.scores:
        cells = [score.task, score.group or "-", str(score.config_id), f"{score.top1:.2f}"]
        if published:
            cells += [f"{score.published:.2f}", f"{score.top1 - score.published:+.2f}"]
        table.add_row(*cells)
    ours = suite.summary["ours"]
    label = "mean of 19" if ours["all_vtab_tasks"] else f"mean of {ours['tasks']} tasks"
    means = [(label, ours["mean"], published and published["mean"])]
    if ours["mean_of_group_means"] is not None:
        groups = "/".join(ours["group_means"])
        means.append((f"mean of group means ({groups})", ours["mean_of_group_means"],
                      published and published["mean_of_group_means"]))
    table.add_section()
    for name, value, reference in means:
        table.add_row(f"[bold]{name}", "", "", f"[bold]{value:.2f}",
                      *([f"{reference:.2f}", f"{value - reference:+.2f}"] if published else []))
    console.print(table)
    if suite.summary.get("selected_on_test"):
        _warn(f"selected on test in {', '.join(suite.summary['selected_on_test'])}: those tasks' top-1 are the best of "
              "their sweeps on test, optimistic estimates rather than held-out scores.")
    if not published:
        console.print("[dim]Published numbers are shown for LAST on caches of the pretrained vit_b16 "
                      "(vit_base_patch16_224.orig_in21k).")
    console.print(f"Results: {suite.out}/summary.json, summary.csv, summary.png; one sweep folder per task.")


def _warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}")


def _tensorboard(log_to: str) -> bool:
    if log_to not in ("none", "tensorboard"):
        raise SidetuneError(f"--log takes none or tensorboard, not '{log_to}'.")
    return log_to == "tensorboard"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _number(text: str):
    """'3e-4' -> 0.0003, '16' -> 16, 'cls' -> 'cls', 'true' -> True."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@app.command(short_help="Offline end to end: digits into a cache, then a LAST run.")
def demo(
    out: Path = typer.Option(Path("cache/digits"), help="Where to write the demo cache."),
    model: str = typer.Option("test_vit", help="A small timm ViT, randomly initialised."),
    run: Path = typer.Option(Path("runs/digits-demo"), help="Where to write the demo run."),
) -> None:
    """Offline end to end: scikit-learn's digits through a small random timm ViT into a cache,
    then a LAST side network trained from it (train800val200 -> test). An earlier demo run is kept:
    this one then goes beside it."""
    import datetime as dt

    if run.exists() and any(run.iterdir()):
        earlier, run = run, run.with_name(f"{run.name}-{dt.datetime.now():%Y%m%d-%H%M%S}")
        console.print(f"[dim]{earlier} holds an earlier demo run, kept as it is; this one goes to {run}")
    call_with_defaults(extract, model=model, dataset="digits", out=out, pretrained=False)
    call_with_defaults(train, cache=out, method="last", rank=8, epochs=10, lr=3e-3, out=run)


@app.command(short_help="The side networks and probes: options and default grids.")
def methods(as_json: bool = typer.Option(False, "--json", help="Print the descriptions as JSON.")) -> None:
    """List the side networks and probes: each one's options (the flags of train and sweep) and the grid a sweep tries by default."""
    from sidetune.declarations import method_records, option_flag

    described = method_records()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    table = folding_table("method", "what it is", "options (default)", "default sweep grid", show_lines=True)
    for entry in described:
        options = "\n".join(option_flag(o["name"], o["default"]) for o in entry["options"])
        grid = "\n".join(f"{name}: {', '.join(f'{v:g}' for v in values)}" for name, values in entry["default_grid"].items())
        what = entry["summary"] + (f" (default λ {entry['default_weight_decay']:g})" if entry["closed_form"] else
                                   f" (default lr {entry['default_lr']:g}, {entry['default_epochs']} epochs, wd "
                                   f"{entry['default_weight_decay']:g})")
        table.add_row(entry["method"], what, options, grid)
    console.print(table)
    console.print("Each option's meaning: `sidetune train --help`; the formulations: docs/methods.md.")


@app.command(short_help="The backbone aliases.")
def models() -> None:
    """List the backbone aliases."""
    from sidetune.backbones import ALIASES

    table = folding_table("alias", "timm model")
    for alias, name in ALIASES.items():
        table.add_row(alias, name)
    console.print(table)


@app.command(short_help="The VTAB-1k and FGVC catalogues and the bundled datasets.")
def datasets() -> None:
    """List the VTAB-1k and FGVC catalogues and the bundled datasets."""
    from sidetune.datasets import FGVC_TASKS, VTAB_TASKS

    table = folding_table("task", "group", "classes", "hub copy / folder under --data-root")
    for task in VTAB_TASKS.values():
        table.add_row(task.name, task.group, str(task.num_classes), task.hub_id or "-")
    for fgvc in FGVC_TASKS.values():
        table.add_row(fgvc.name, "fgvc", str(fgvc.num_classes), f"{' or '.join(fgvc.folders[:2])} (VPT's JSON splits)")
    table.add_row("digits", "bundled", "10", "scikit-learn, offline")
    console.print(table)
    console.print("Any folder is a dataset too: VTAB-1k list files, VPT's train/val/test.json, class folders of images, "
                  "a datasets.save_to_disk folder; and video: class folders (or list files) of clips, each a video file "
                  "(mp4, webm, avi, mkv) or a folder of frames, read with --frames T (default 8) or --frame-stride.")


def main() -> None:
    """Console-script entry point: user errors print as one paragraph (exit status 2); Ctrl-C
    says what was kept and how to resume (exit status 130)."""
    from sidetune.errors import Interrupted
    from sidetune.malloc import keep_freed_memory

    keep_freed_memory()
    try:
        app()  # typer ends a bare Ctrl-C itself, silently (exit status 130); train, sweep and extract raise Interrupted
    except SidetuneError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise SystemExit(2)
    except Interrupted as interruption:
        console.print(f"[yellow]interrupted:[/] {interruption}")
        raise SystemExit(130)
