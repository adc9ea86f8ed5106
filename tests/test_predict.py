"""`sidetune predict`: new images through the recorded backbone and a trained side network."""

import json

import pytest
import torch
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import config, extract_tiny
from sidetune.predict import predict
from sidetune.runs import open_run
from sidetune.train import train
from sidetune.training import TrainConfig, restore_sidenet


@pytest.fixture
def trained_run(tmp_path, vtab_folder):
    """test_vit features of a VTAB-style folder (test cached too), and a LAST run on them."""
    extract_tiny(vtab_folder, tmp_path / "cache", splits=["train800", "val200", "train800val200", "test"])
    run_dir, _ = train(tmp_path / "cache", config("last", epochs=2, rank=4), out=tmp_path / "run")
    return run_dir, sidetune.open_cache(tmp_path / "cache"), vtab_folder


def test_predict_gives_the_cached_logits_for_images_in_the_cache(trained_run):
    run_dir, cache, folder = trained_run
    paths = [folder / line.split()[0] for line in (folder / "test.txt").read_text().splitlines()]
    predictions = predict(run_dir, paths)
    run = open_run(run_dir)
    net = restore_sidenet(run.cache_info, TrainConfig.from_record(run.config["config"]), run.state())
    with torch.no_grad():
        cached_logits = net(torch.from_numpy(cache.split("test").load()).float())[0]
    torch.testing.assert_close(torch.stack([p.logits for p in predictions]), cached_logits, atol=1e-5, rtol=1e-5)
    assert [p.path for p in predictions] == paths


def test_predict_command_prints_classes_and_probabilities_for_a_folder(trained_run):
    run_dir, _, folder = trained_run
    result = CliRunner().invoke(app, ["predict", str(folder / "images"), "--run", str(run_dir), "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 22  # every image of the folder (12 train, 4 val, 6 test)
    for row in rows:
        (first, p1), (second, p2) = row["top"]
        assert first in {"0", "1", "2", "3"} and p1 >= p2 and 0 < p1 <= 1
        assert torch.tensor(row["logits"]).softmax(-1).max().item() == pytest.approx(p1)


def test_predict_refuses_weights_other_than_the_caches(trained_run, tiny_weights):
    run_dir, _, folder = trained_run
    with pytest.raises(sidetune.SidetuneError, match="not the ones the cache was built with"):
        predict(run_dir, [folder / "images"], weights=tiny_weights)


def test_predict_names_an_unreadable_image(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(sidetune.SidetuneError, match="Could not read image .*broken.png"):
        predict(run_dir, [broken])
