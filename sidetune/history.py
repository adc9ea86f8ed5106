"""Everything run under a folder (runs/ by default): training runs, sweeps and suites of sweeps,
one record each, read only from the files they already write (metrics.json and config.json,
sweep.json, summary.json). `sidetune runs` shows them as one table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from sidetune.errors import SidetuneError
from sidetune.runs import CONFIG_FILE, METRICS_FILE, read_record

SETTINGS = ("lr", "weight_decay", "epochs", "rank", "token_rank", "channel_rank")  # shown always
USUAL = {"gap": 1, "depth": 1, "heads": 1, "pool": "cls"}  # shown when they are not these


def list_runs(root: str | Path = "runs") -> list[dict]:
    """One record per finished run, sweep and suite under `root` (any depth; a suite's own
    sweeps and a sweep's kept models are listed inside it, not again), newest first. A folder
    whose files cannot be read is listed as kind "damaged", saying why, and the rest still are."""
    root = Path(root)
    if not root.is_dir():
        raise SidetuneError(f"No folder {root}: `sidetune train` and `sidetune sweep` write their runs to ./runs; "
                            "pass the folder that holds them.")
    # a suite's sweeps and a sweep's kept models are listed inside it, not again
    containers = {path.parent for name in ("summary.json", "sweep.json") for path in root.rglob(name)}
    records = []
    for folder in sorted(path for path in root.rglob("*") if path.is_dir()):
        if any(parent in containers for parent in folder.parents):
            continue
        try:
            record = _read(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SidetuneError) as error:
            problem = str(error) if isinstance(error, SidetuneError) else f"{type(error).__name__}: {error}"
            record = _record("damaged", folder, "-", "-", f"cannot be read: {problem}", "-", None, None,
                             _modified(folder))
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r["created"] or "", reverse=True)


def _read(folder: Path) -> dict | None:
    if (folder / METRICS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        metrics, config = (read_record(folder / name) for name in (METRICS_FILE, CONFIG_FILE))
        settings = (f"closed form, wd {metrics['weight_decay']:g}" if metrics.get("closed_form")
                    else _settings(metrics["hyperparameters"]))
        return _record("run", folder, metrics["method"], metrics["dataset"], settings,
                       f"{metrics['train_split']} -> {metrics['eval_split']}", metrics["top1"], metrics["seconds"],
                       config.get("created"))
    if (folder / "sweep.json").is_file():
        sweep = read_record(folder / "sweep.json")
        best = sweep["best"]
        count = sweep.get("configurations") or len({json.loads(line)["config_id"] for line in
                                                    (folder / "results.jsonl").read_text().splitlines() if line})
        protocol = {"vtab": "val"}.get(sweep["protocol"], sweep["protocol"])  # sweeps before roles said vtab
        selected = ", SELECTED ON TEST" if sweep.get("selected_on_test") else ""
        settings = f"{count} configs, {protocol} protocol{selected}; best {_settings(best)}"
        return _record("sweep", folder, best["method"], Path(sweep["cache"]).name, settings,
                       f"{best['train_split']} -> {best['eval_split']}", best["top1"], sweep.get("seconds"),
                       sweep.get("created"))
    if (folder / "summary.json").is_file():
        summary = read_record(folder / "summary.json")
        tasks = summary["tasks"]
        return _record("suite", folder, summary["method"], f"{len(tasks)} tasks", f"{len(tasks)} sweeps",
                       f"{'/'.join(summary.get('protocols', ['val']))} protocol"
                       + (", selected on test" if summary.get("selected_on_test") else ""),
                       summary["ours"]["mean"], summary.get("seconds"),
                       summary.get("created") or _modified(folder / "summary.json"))
    return None


def _record(kind: str, folder: Path, method: str, data: str, settings: str, splits: str, top1: float | None,
            seconds: float | None, created: str | None) -> dict:
    return {"kind": kind, "path": str(folder), "method": method, "data": data, "settings": settings,
            "splits": splits, "top1": top1, "seconds": seconds, "created": created}


def _settings(values: dict) -> str:
    shown = [name for name in SETTINGS if name in values]
    shown += [name for name, usual in USUAL.items() if name in values and values[name] != usual]
    return ", ".join(f"{'wd' if name == 'weight_decay' else name} {values[name]}" for name in shown)


def _modified(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
