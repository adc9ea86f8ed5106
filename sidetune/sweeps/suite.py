"""Several tasks at once: the same sweep on every cache in a folder, then the VTAB-1k summary.

    sidetune sweep --caches ./cache --tasks all --method last --lr 1e-3,3e-3

Each task gets its own sweep directory (out/<task>/, as `sidetune sweep --cache` writes it);
the summary reports the mean of the tasks' top-1 and the mean of the group means (natural,
specialized, structured), beside the published LAST numbers when the caches were extracted
with the original ImageNet-21k ViT-B/16."""

from __future__ import annotations

import csv
import datetime as dt
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from sidetune import runs
from sidetune.cache.reader import Cache, open_cache
from sidetune.compute import resolve_device
from sidetune.datasets.catalogue import FGVC_GROUP, FGVC_TASKS, GROUPS, PUBLISHED_BACKBONE, PUBLISHED_TOP1, VTAB_TASKS
from sidetune.distributed import current_world
from sidetune.errors import SidetuneError
from sidetune.results import plot_task_scores
from sidetune.sweeps import SweepReport, sweep, sweep_dir
from sidetune.training import TrainConfig


@dataclass
class TaskScore:
    """One task's reported result: the best configuration's top-1 from its sweep."""

    task: str
    group: str | None  # VTAB-1k group; None for a dataset outside VTAB-1k
    top1: float
    published: float | None  # the published number for this method and backbone, when there is one
    config_id: int
    sweep_dir: str


@dataclass
class SuiteReport:
    out: Path
    scores: list[TaskScore]
    summary: dict  # `summarize` of ours, and of the published numbers over the same tasks
    sweeps: dict[str, SweepReport]


def sweep_sources(cache: str | None, caches: str | Path | None, root: str | Path = "cache"
                  ) -> tuple[str | None, Path | None]:
    """What `sidetune sweep` runs on, as (one cache, or a folder of caches, one per task): the one
    given, or with neither the caches under `root` (./cache, where `sidetune extract` writes):
    the one cache there, else all of them as tasks."""
    if cache is not None and caches is not None:
        raise SidetuneError("Pass one of --cache (one task) or --caches (a folder of caches, one per task), not both.")
    if cache is not None or caches is not None:
        return cache, None if caches is None else Path(caches)
    if not Path(root).is_dir():
        raise SidetuneError(f"No caches under ./{root}, where `sidetune extract` writes them: run `sidetune extract "
                            f"--model vit_b16 --dataset dtd` first (it writes ./{root}/dtd), or pass --cache or --caches.")
    found = find_caches(root)  # its own refusal says what is wrong with the folder
    return (str(next(iter(found.values())).path), None) if len(found) == 1 else (None, Path(root))


def find_caches(root: str | Path, tasks: str | list[str] = "all") -> dict[str, Cache]:
    """The caches in the sub-folders of `root`, by task name (the VTAB-1k task the cache was
    extracted from, else its dataset name): every one for `all`, else the tasks named."""
    root = Path(root)
    if not root.is_dir():
        raise SidetuneError(f"--caches {root} is not a folder; pass the folder holding one cache per task "
                            "(e.g. ./cache, written by `sidetune extract --dataset TASK`).")
    found: dict[str, Cache] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        try:
            cache = open_cache(folder)
        except SidetuneError:
            continue  # not a cache
        name = cache.info.task_name
        if name in found:
            raise SidetuneError(f"Two caches under {root} hold task {name}: {found[name].path} and {folder}. "
                                "Keep one per task, or point --caches at a folder with one of them.")
        found[name] = cache
    if not found:
        raise SidetuneError(f"No sidetune caches under {root}. Extract one per task there first "
                            f"(sidetune extract --dataset TASK --out {root}/TASK).")
    wanted = list(found) if tasks == "all" else list(tasks)
    missing = [name for name in wanted if name not in found]
    if missing:
        raise SidetuneError(f"No cache for task {', '.join(missing)} under {root}; it holds {', '.join(found)}. "
                            "Pass --tasks all or some of those.")
    selected = {name: found[name] for name in wanted}
    backbones = {c.info.backbone_identity for c in selected.values()}
    if len(backbones) > 1:
        listing = "; ".join(f"{name}: {c.info.backbone_identity[0]} ({c.info.backbone_identity[1][:12]})"
                            for name, c in selected.items())
        raise SidetuneError(f"The caches under {root} come from different backbones ({listing}); a summary over "
                            "them means nothing. Pick tasks from one backbone with --tasks.")
    return selected


def group_of(task: str) -> str | None:
    if task in FGVC_TASKS:
        return FGVC_GROUP
    return VTAB_TASKS[task].group if task in VTAB_TASKS else None


def summarize(scores: dict[str, float]) -> dict:
    """The VTAB-1k summary of per-task top-1: the mean over the tasks, each group's mean, and the
    mean of the group means (over the groups present; tasks outside VTAB-1k count only in the
    plain mean)."""
    groups: dict[str, list[float]] = {}
    for task, top1 in scores.items():
        if group_of(task) is not None:
            groups.setdefault(group_of(task), []).append(top1)
    group_means = {group: statistics.fmean(groups[group]) for group in GROUPS if group in groups}
    return {
        "tasks": len(scores),
        "all_vtab_tasks": set(scores) == set(VTAB_TASKS),
        "mean": statistics.fmean(scores.values()),
        "group_means": group_means,
        "mean_of_group_means": statistics.fmean(group_means.values()) if group_means else None,
    }


def published_scores(backbone: Mapping[str, Any], method: str) -> dict[str, float]:
    """The published per-task top-1 comparable with caches of `backbone` (a manifest's record)
    for `method`: only for the original ImageNet-21k ViT-B/16 with pretrained weights."""
    if backbone["timm_name"] != PUBLISHED_BACKBONE or backbone["weights_source"].startswith("random"):
        return {}
    return PUBLISHED_TOP1.get(method, {})


def sweep_tasks(root: str | Path, configs: list[TrainConfig], *, tasks: str | list[str] = "all",
                out: str | Path | None = None, device: str = "auto",
                on_task: Callable[[str, int, int], None] | None = None, **sweep_options) -> SuiteReport:
    """Run `sweep` with `configs` on each task's cache under `root` (into out/<task>/), then
    write summary.json, summary.csv and summary.png to `out`. `on_task(name, number, total)`
    hears each task start. Rerunning with the same `out` resumes every task's sweep. Under
    torchrun every task's sweep is shared between the ranks and rank 0 writes the summary."""
    caches = find_caches(root, tasks)
    world = current_world(resolve_device(device))
    out = sweep_dir(out, root, world)
    method = configs[0].method
    published = published_scores(next(iter(caches.values())).info.backbone, method)
    sweeps, scores = {}, []
    for number, (name, cache) in enumerate(caches.items()):
        if on_task is not None:
            on_task(name, number, len(caches))
        report = sweep(cache, configs, out=out / name, device=device, **sweep_options)
        sweeps[name] = report
        scores.append(TaskScore(name, group_of(name), report.best.top1, published.get(name), report.best.config_id,
                                str(report.out)))
    ours = summarize({s.task: s.top1 for s in scores})
    theirs = {s.task: s.published for s in scores if s.published is not None}
    summary = {"method": method, "ours": ours, "protocols": sorted({r.protocol.name for r in sweeps.values()}),
               "selected_on_test": sorted(name for name, r in sweeps.items() if r.protocol.selected_on_test),
               "published": summarize(theirs) if len(theirs) == len(scores) else None,
               "published_source": ("LAST, ViT-B/16 ImageNet-21k: V-PETL Bench's VTAB-1k table, the LAST paper's FGVC"
                                    if theirs else None)}
    report = SuiteReport(out, scores, summary, sweeps)
    if world.is_main:
        write_summary(report)
    world.barrier()
    return report


def write_summary(report: SuiteReport) -> None:
    rows = [asdict(score) for score in report.scores]
    runs.write_json(report.out / "summary.json", {
        "tasks": rows, **report.summary, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(sum(sweep.seconds for sweep in report.sweeps.values()), 3)})
    with open(report.out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_task_scores(rows, report.out / "summary.png", f"{report.summary['method']}: top-1 per task")
