"""`sidetune sweep --caches DIR --tasks ...`: one sweep per task and the VTAB-1k summary."""

import json
import statistics

import pytest
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import assert_plot_drawn, extract_tiny, write_vtab_folder
from sidetune.datasets.catalogue import FGVC_TASKS, PUBLISHED_TOP1, VTAB_TASKS
from sidetune.sweeps.suite import find_caches, published_scores, summarize, sweep_tasks

TASKS = ("dtd", "eurosat", "kitti")  # one task from each VTAB-1k group


@pytest.fixture(scope="module")
def task_caches(tmp_path_factory):
    """A folder of three test_vit caches extracted from tiny VTAB-1k task folders."""
    data_root, caches = tmp_path_factory.mktemp("vtab"), tmp_path_factory.mktemp("caches")
    for seed, task in enumerate(TASKS):
        write_vtab_folder(data_root / task, seed=seed)
        extract_tiny(task, caches / task, data_root=data_root)
    return caches


def test_the_published_last_table_gives_the_published_means():
    summary = summarize({task: top1 for task, top1 in PUBLISHED_TOP1["last"].items() if task in VTAB_TASKS})
    assert summary["all_vtab_tasks"] and summary["tasks"] == 19
    assert round(summary["mean"], 2) == 74.15
    assert round(summary["mean_of_group_means"], 2) == 76.44


def test_published_numbers_apply_only_to_the_pretrained_vit_b16():
    vit_b16 = {"timm_name": "vit_base_patch16_224.orig_in21k", "weights_source": "hub:timm/vit_base_patch16_224.orig_in21k"}
    assert published_scores(vit_b16, "last")["dtd"] == 76.1
    assert published_scores({**vit_b16, "weights_source": "random(seed=0)"}, "last") == {}
    assert published_scores({**vit_b16, "timm_name": "vit_base_patch16_224.augreg_in21k"}, "last") == {}
    assert published_scores(vit_b16, "losa") == {}


def test_every_task_is_swept_and_summarised_by_vtab_group(task_caches, tmp_path):
    configs = sidetune.expand_grid("linear", {"lr": [0.01, 0.1]}, {"epochs": 2})
    suite = sweep_tasks(task_caches, configs, out=tmp_path / "suite")
    assert [(s.task, s.group) for s in suite.scores] == [("dtd", "natural"), ("eurosat", "specialized"), ("kitti", "structured")]
    for score in suite.scores:
        assert score.top1 == suite.sweeps[score.task].best.top1 and score.published is None
        assert (tmp_path / "suite" / score.task / "results.jsonl").exists()
    written = json.loads((tmp_path / "suite" / "summary.json").read_text())
    top1 = [s.top1 for s in suite.scores]
    assert written["ours"]["mean"] == pytest.approx(statistics.fmean(top1))
    assert written["ours"]["group_means"] == pytest.approx({"natural": top1[0], "specialized": top1[1], "structured": top1[2]})
    assert written["published"] is None and not written["ours"]["all_vtab_tasks"]
    assert_plot_drawn(tmp_path / "suite" / "summary.png")


def test_named_tasks_are_checked_against_the_caches_found(task_caches):
    assert list(find_caches(task_caches, ["kitti", "dtd"])) == ["kitti", "dtd"]
    with pytest.raises(sidetune.SidetuneError, match="No cache for task svhn .* it holds dtd, eurosat, kitti"):
        find_caches(task_caches, ["svhn"])


def test_caches_from_different_backbones_are_not_summarised_together(task_caches, tmp_path, tiny_weights):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "dtd").symlink_to(task_caches / "dtd")
    extract_tiny("digits", mixed / "digits", weights=tiny_weights, limit=16)
    with pytest.raises(sidetune.SidetuneError, match="different backbones"):
        find_caches(mixed)


def test_a_bare_sweep_beside_caches_it_cannot_use_says_why(task_caches, tmp_path, tiny_weights, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "dtd").symlink_to(task_caches / "dtd")
    extract_tiny("digits", tmp_path / "cache" / "digits", weights=tiny_weights, limit=16)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "--method", "linear", "--epochs", "1"])
    assert isinstance(result.exception, sidetune.SidetuneError) and "different backbones" in str(result.exception)


def test_a_bare_sweep_without_a_cache_folder_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "--method", "linear"])
    assert isinstance(result.exception, sidetune.SidetuneError)
    assert "No caches under ./cache" in str(result.exception) and "sidetune extract" in str(result.exception)


def test_sweep_command_over_a_folder_of_caches_prints_the_summary(task_caches, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--caches", str(task_caches), "--tasks", "dtd,kitti", "--method", "linear",
                                      "--lr", "0.01,0.1", "--epochs", "2", "--out", str(tmp_path / "suite")])
    assert result.exit_code == 0, result.output
    assert "mean of 2 tasks" in result.output and "mean of group means (natural/structured)" in result.output
    assert sorted(p.name for p in (tmp_path / "suite").iterdir() if p.is_dir()) == ["dtd", "kitti"]


def test_the_summary_table_sets_published_numbers_and_their_means_beside_ours(tmp_path):
    from cli.main import print_summary
    from cli.progress import console
    from sidetune.sweeps.suite import SuiteReport, TaskScore

    ours = {"dtd": 70.0, "eurosat": 95.0}
    scores = [TaskScore(task, group, ours[task], PUBLISHED_TOP1["last"][task], 0, str(tmp_path / task))
              for task, group in (("dtd", "natural"), ("eurosat", "specialized"))]
    published = summarize({task: PUBLISHED_TOP1["last"][task] for task in ours})
    suite = SuiteReport(tmp_path, scores, {"method": "last", "ours": summarize(ours), "published": published}, {})
    with console.capture() as captured:
        print_summary(suite)
    text = captured.get()
    assert "76.10" in text and "-6.10" in text  # dtd: published, and ours minus published
    assert "mean of 2 tasks" in text and f"{(76.1 + 96.3) / 2:.2f}" in text


def test_the_published_last_fgvc_numbers_give_the_papers_mean_of_five():
    vit_b16 = {"timm_name": "vit_base_patch16_224.orig_in21k", "weights_source": "hub:timm/vit_base_patch16_224.orig_in21k"}
    published = published_scores(vit_b16, "last")
    summary = summarize({task: published[task] for task in FGVC_TASKS})
    assert summary["tasks"] == 5 and round(summary["mean"], 1) == 89.5 and summary["mean_of_group_means"] is None
