"""Render benchmarks/results/*.json into the tables of docs/benchmarks.md.

    python benchmarks/report.py

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in the docs and is
replaced whole; the prose around the tables is written by people."""

from __future__ import annotations

import json
import re
from pathlib import Path

from common import RESULTS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def describe(record: dict) -> str:
    m = record["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}, {m['threads']} threads)"
    return f"Measured on {where}, torch {m['torch']}."


def stage_two(record: dict) -> str:
    memory = "peak GPU memory allocated (MiB)" if record["machine"]["device"] == "cuda" else "peak RSS (MiB)"
    note = f" {record['note']}" if record.get("note") else ""
    heading = (f"{describe(record)} {record['model']} ({'pretrained' if record['pretrained'] else 'random weights'}), "
               f"{record['images']} generated images (their train split).{note}\n\n")
    if "summary" not in record:  # written before the per-method rows (LAST only; round two's first GPU run)
        rows = [[r["batch_size"], r["method"], r["epoch_seconds"], f"{r['time_ratio_to_cache']}x",
                 round(r["peak_memory_bytes"] / 2**20), f"{r['memory_ratio_to_cache']}x"] for r in record["rows"]]
        return heading + table(["batch", "way", "s / epoch", "time vs cache", memory, "memory vs cache"], rows)
    summary = [[r["batch_size"], r["method"], r["cache_seconds"], r["cache_compiled_seconds"], r["paper_seconds"],
                f"{r['over_paper']}x", f"{r['over_paper_compiled']}x", f"{r['over_lora']}x", f"{r['over_lora_compiled']}x",
                f"{r['side_gflop_per_image'] * 1000:.3g}", f"{100 * r['efficiency']:.2g}%", f"{100 * r['efficiency_compiled']:.2g}%"]
               for r in record["summary"]]
    rows = [[r["batch_size"], r["method"], r["way"], r["epoch_seconds"], round(r["peak_memory_bytes"] / 2**20)]
            for r in record["rows"]]
    return (heading + f"The backbone's forward: {record['backbone_gflop_per_image']} GFLOP per image. Each case the "
            f"fastest of {record['repeats']} processes.\n\n"
            + table(["batch", "side network", "cache s / epoch", "compiled", "paper's way", "speed-up over paper's way",
                     "compiled", "over LoRA", "compiled", "side MFLOP / image (training)", "FLOP efficiency vs the forward",
                     "compiled"], summary)
            + "\n\nEvery case:\n\n" + table(["batch", "side network", "way", "s / epoch", memory], rows))


def sweep_amortisation(record: dict) -> str:
    rows = [[r["method"] + (" (compiled)" if r["compile"] else ""), r["configs"], r["seconds"], f"{r['ratio_to_one']}x",
             r.get("separate_seconds"), f"{r['speedup_over_separate']}x" if "speedup_over_separate" in r else None,
             r.get("first_run_seconds")] for r in record["rows"]]
    return (f"{describe(record)} {record['epochs']} epochs of digits train800 on the test_vit cache.\n\n"
            + table(["method", "K", "stacked (s)", "vs K = 1", "K separate runs (s)", "stacking speed-up",
                     "first run, compiling (s)"], rows))


def sweep_vs_runs(record: dict) -> str:
    rows = [[r["case"], "kept (the CLI's default)" if r["malloc"] == "kept" else "glibc's default", r["seconds"],
             f"{r['vs_separate']}x", r["user"], r["system"], f"{r['minor_faults']:,}"] for r in record["rows"]]
    return (f"{describe(record)} {record['configs']} {record['method']} configurations, {record['epochs']} epochs "
            f"of digits train800 (scored on val200) on the {record['model']} cache, each case a whole command.\n\n"
            + table(["case", "freed memory", "seconds", "vs separate runs", "user (s)", "system (s)", "minor page faults"],
                    rows))


def extraction(record: dict) -> str:
    rows = [[r["measure"], r["value"], f"{r['ratio']:.0%}" if "ratio" in r else None] for r in record["rows"]]
    allocator = {"kept": ", glibc keeping freed memory (the CLI's default)", "default": ", glibc's own malloc settings"}
    return (f"{describe(record)} {record['model']}, {record['images']} images, batch {record['batch_size']}, "
            f"{record['cache_bytes'] / 1e6:.0f} MB of cache{allocator.get(record.get('malloc'), '')}.\n\n"
            + table(["measure", "value", "of the baseline"], rows))


def loading(record: dict) -> str:
    rows = [[r["page_cache"], r["load_seconds"], r["raw_seconds"], r["load_MBps"], r["raw_MBps"], f"{r['ratio']:.0%}"]
            for r in record["rows"]]
    return (f"{describe(record)} Split of {record['bytes'] / 1e6:.0f} MB.\n\n"
            + table(["page cache", "load (s)", "raw read (s)", "load MB/s", "raw MB/s", "load speed of raw"], rows))


def step_profile(record: dict) -> str:
    shapes = record["shapes"]
    captured = "captured (CUDA graph)" if record["machine"]["device"] == "cuda" else "compiled (torch.compile)"
    rows = [[r["method"], captured if r["variant"] == "captured" else r["variant"], r["configs"],
             r["ms_per_step"] if r["ms_per_step"] is not None else "out of memory", r["ms_per_config"]] for r in record["rows"]]
    text = (f"{describe(record)} One training step at width {shapes['width']}, {shapes['depth']} blocks, "
            f"{shapes['tokens']} tokens, batch {shapes['batch_size']} (random tokens).\n\n"
            + table(["method", "variant", "K", "ms / step", "ms / config"], rows))
    counts = record.get("launch_counts")
    if counts:
        where = "on the GPU" if record["machine"]["device"] == "cuda" else "Triton's interpreter standing in for a GPU"
        count_rows = [[c["method"], c["modules"], c["configs"], f"{c['torch_path']['compute_ops']:.0f}",
                       f"{c['fused']['compute_ops']:.0f} + {c['fused']['triton_launches']:.0f}",
                       f"{c['fused']['launches']:.0f}"] for c in counts]
        text += (f"\n\nKernel launches of one eager step (benchmarks/launches.py; fused path counted with {where}):\n\n"
                 + table(["method", "modules", "K", "torch path: compute ops", "fused: ops + Triton", "fused: launches"],
                         count_rows))
    return text


def storage(record: dict) -> str:
    from sidetune.cache.plan import human_bytes

    rows = sorted(record["rows"], key=lambda r: -r["suite_live"])
    summary = [[r["spec"], human_bytes(r["suite_live"] / 19), human_bytes(r["suite_live"]), human_bytes(r["suite_cached"]),
                f"{r['suite_cached'] / r['suite_live']:.0f}x"] for r in rows]
    shown = [r for r in rows if r["spec"] in ("default", "int8", "gap2", "gap2-int8", "final", "cls")]
    per_task = [[task, f"{images:,}"] + [f"{human_bytes(r['per_task_live'][task])} / {human_bytes(r['per_task_cached'][task])}"
                                         for r in shown] for task, images in record["test_images"].items()]
    return (f"{record['backbone']}: the 1000 training images stored once (train800 and val200 as rows), test live or cached.\n\n"
            + table(["spec", "a task, test live (mean)", "19 tasks, test live", "19 tasks, test cached", "cached / live"], summary)
            + "\n\nPer task, test live / test cached:\n\n"
            + table(["task", "test images", *[r["spec"] for r in shown]], per_task)
            + storage_per_image(record))


def storage_per_image(record: dict) -> str:
    from sidetune.cache.plan import human_bytes

    if "per_image" not in record:
        return ""
    specs = list(record["per_image"][0]["bytes"])
    rows = [[r["backbone"], r["stages"], *[human_bytes(r["bytes"][spec]) for spec in specs]] for r in record["per_image"]]
    return ("\n\nPer image, by backbone (224 x 224 input; a CNN's or Swin's stages differ in shape, so `cnn-grid7` pools "
            "each grid to at most 7 x 7 and `cnn-last2` keeps the last two stages, pooled alike):\n\n"
            + table(["backbone", "stages", *specs], rows))


def codecs(record: dict) -> str:
    stages = record["stages"]
    picks = [0, len(stages) // 2, len(stages) - 1]
    rows = [[r["format"], f"{r['bytes_per_image'] / 1e3:.1f}", r["load_seconds"], r["gather_epoch_seconds"],
             *[f"{r['error_per_stage'][i]:.2%} / {r['cls_error_per_stage'][i]:.2%}" for i in picks],
             r["linear_top1"], r["last_top1"]] for r in record["rows"]]
    return (f"{describe(record)} digits through {record['model']} (random weights); train800val200 stored.\n\n"
            + table(["format", "KB / image", "load (s)", "gather an epoch (s)",
                     *[f"error, stage {stages[i]} (all / CLS)" for i in picks], "linear top-1", "LAST top-1"], rows))


def halving(record: dict) -> str:
    rows = [[r["task"], r["method"], r["configs"], r["epochs"], r["full_seconds"], r["halving_seconds"], f"{r['time_ratio']}x",
             f"{r['full_epochs_trained']} / {r['halving_epochs_trained']}", r["full_winner"], r["halving_winner"],
             f"{r['full_test_top1']:.2f}", f"{r['halving_test_top1']:.2f}"] for r in record["rows"]]
    return (f"{describe(record)} The default grids through the random {record['model']}, VTAB protocol.\n\n"
            + table(["task", "method", "configs", "epochs", "full (s)", "halving (s)", "time", "epochs trained (full / halving)",
                     "winner (full)", "winner (halving)", "test top-1 (full)", "test top-1 (halving)"], rows))


def ridge(record: dict) -> str:
    rows = [[r["way"], r["seconds"], f"{r['best_top1']:.1f}", r["best_setting"]] for r in record["rows"]]
    return (f"{describe(record)} {record['dataset']} through the random {record['model']}, train800 -> val200.\n\n"
            + table(["way", "seconds", "best val200 top-1", "at"], rows))


def methods(record: dict) -> str:
    rows = [[r["task"], r["method"], f"{r['top1']:.1f}", r["seconds"], f"{r['params']:,}",
             r["epochs"] or "closed form", r["configurations"]] for r in record["rows"]]
    return (f"{describe(record)} The random {record['model']}; train800 -> val200.\n\n"
            + table(["task", "method", "val200 top-1", "seconds", "parameters", "epochs", "configurations"], rows))


def real_weights(record: dict) -> str:
    by = {(r["weights"], r["method"]): r for r in record["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in record["rows"]))
    rows = [[method, f"{by['pretrained', method]['top1']:.1f}", f"{by['random', method]['top1']:.1f}",
             f"{by['pretrained', method]['top1'] - by['random', method]['top1']:+.1f}",
             f"{by['pretrained', method]['top1'] - by['pretrained', 'linear']['top1']:+.1f}",
             by["pretrained", method]["configurations"], by["pretrained", method]["seconds"]] for method in methods]
    extract = by["pretrained", methods[0]]["extract_seconds"]
    return (f"{describe(record)} {record['model']} on {record['dataset']}: train800 / val200 from its training set, "
            f"test = a fixed sample of {record['test_images']:,} of its test images; every stage, grids pooled to "
            f"3 x 3; each method's default grid ({record['epochs']} epochs) selected on val200, refit on train800val200. "
            f"Extracting a cache took {extract} s.\n\n"
            + table(["method", "pretrained top-1", "random top-1", "pretrained - random", "vs linear (pretrained)",
                     "configurations", "sweep seconds"], rows))


def views(record: dict) -> str:
    rows = [[r["task"], r["method"], r["variant"], f"{r['test_top1']:.1f}", r["bytes"], r["seconds"]] for r in record["rows"]]
    return (f"{describe(record)} {record['views_stored']} stored views of every training image (VPT's transform); each "
            f"variant at the method's defaults ({record['epochs']} epochs) on train800val200, scored on test.\n\n"
            + table(["task", "method", "augmentation", "test top-1", "training tokens stored", "seconds"], rows))


def defaults(record: dict) -> str:
    tests = {(t["task"], t["method"], t["setting"]): t["test_top1"] for t in record["tests"]}
    linear = {task: tests[task, "linear", "chosen"] for task in record["tasks"]}

    def setting(s: dict) -> str:
        return f"λ {s['weight_decay']:g}" if s["lr"] == 0 else f"lr {s['lr']:g}, {s['epochs']} ep"

    rows = []
    for method, chosen in record["defaults"].items():
        rows.append([method, setting(chosen), setting(chosen["before"])]
                    + [f"{tests[task, method, 'chosen']:.1f} ({tests[task, method, 'before']:.1f})" for task in record["tasks"]]
                    + [f"{tests['real-weights', method, 'chosen'] - linear['real-weights']:+.1f}"])
    return (f"{describe(record)} Chosen on val200 (real-weights first, ties within {record.get('tie', 1.0):g} point "
            f"broken on digits); scored on test after training on train800val200, before the change in brackets.\n\n"
            + table(["method", "default", "before", *[f"{task} test top-1" for task in record["tasks"]],
                     "vs linear (real-weights)"], rows))


def video(record: dict) -> str:
    from sidetune.cache.plan import human_bytes

    storage = [[r["spec"], human_bytes(r["clip_8"]), human_bytes(r["clip_16"]), human_bytes(r["kinetics_8"]),
                human_bytes(r["kinetics_16"])] for r in record["storage"]]
    speed = [[r["method"], r["cache_seconds"], r["paper_seconds"], f"{r['speedup']}x"] for r in record["speed"]]
    return (f"Storage at ViT-B/16 (197 tokens x 768 per stage, 13 stages), each shipped spec, per clip and for "
            f"Kinetics-400's {record['kinetics_400_train_clips']:,} training clips:\n\n"
            + table(["spec", "per clip, 8 frames", "16 frames", "Kinetics-400, 8 frames", "16 frames"], storage)
            + f"\n\n{describe(record)} One epoch over the trainval split of {record['clips']} generated clips of "
            f"{record['frames']} frames through a random {record['model']}, batch 8, fastest of 2:\n\n"
            + table(["side network", "from the cache (s)", "backbone every epoch (s)", "speed-up"], speed))


RENDERERS = {"video": video, "views": views, "defaults": defaults, "real_weights": real_weights, "methods": methods, "ridge": ridge, "halving": halving, "codecs": codecs, "storage": storage, "step_profile": step_profile, "stage_two": stage_two, "sweep_amortisation": sweep_amortisation, "sweep_vs_runs": sweep_vs_runs, "extraction": extraction, "loading": loading}


def main() -> None:
    """Each results/NAME.json fills the block NAME, rendered by its benchmark's renderer."""
    text = DOCS.read_text()
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        name = path.stem
        block = f"<!-- results:{name} -->\n{RENDERERS[record['benchmark']](record)}\n<!-- /results:{name} -->"
        pattern = re.compile(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/benchmarks.md has no <!-- results:{name} --> block for {path}")
        text = pattern.sub(lambda _: block, text)
    DOCS.write_text(text)
    print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
