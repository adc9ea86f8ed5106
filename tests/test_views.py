"""Augmented views in the cache: N views of every training image, each the seeded transform of
its image through the backbone (the same bytes however extraction is run or resumed), the
validation and test splits left plain, counted by the disk plan, and drawn one per image per
epoch by stage two."""

import numpy as np
import pytest
import torch
from test_resume import InterruptAfter, assert_same_store, small_shard_spec
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import extract_tiny, float32_spec
from sidetune.errors import Interrupted
from sidetune.training import TrainConfig, train_group
from sidetune.training.data import LoadedSplits


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    """digits' first 8 + 8 images with 3 views each (VPT's transform), float32 so values compare exactly."""
    folder = tmp_path_factory.mktemp("views")
    extract_tiny("digits", folder / "cache", spec=float32_spec(folder), limit=8, views=3)
    return sidetune.open_cache(folder / "cache")


@pytest.mark.parametrize("kind", ["vpt", "dinov2"])
def test_a_view_is_its_images_seeded_transform_through_the_backbone(tmp_path, kind):
    from sidetune.backbones import load_backbone, resolve_preprocessing
    from sidetune.datasets import load_source
    from sidetune.features import stored_layout, stored_tokens
    from sidetune.views import ViewTransform, view_seed

    spec = float32_spec(tmp_path)
    extract_tiny("digits", tmp_path / "cache", spec=spec, limit=4, views=2, view_transform=kind, splits=["train800"])
    cache = sidetune.open_cache(tmp_path / "cache")
    split = load_source("digits", splits=["train800"], limit=4).splits["train800"]
    backbone = load_backbone("test_vit", pretrained=False)
    pre = resolve_preprocessing("vtab", backbone)
    transform = ViewTransform(kind, pre.size, pre.interpolation, pre.mean, pre.std)
    image = transform(split.image(3), view_seed(split.keys()[3], 1))
    with torch.no_grad():
        expected = stored_tokens(backbone, sidetune.load_spec(spec), stored_layout(sidetune.load_spec(spec), backbone),
                                 image[None])[0]
    stored = cache.split("train800").group["views"][3, 1]
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(cache.split("train800").group["views"][3, 0], stored)  # two views, two draws
    assert cache.manifest["views"]["transform"] == kind


def test_views_are_the_same_bytes_after_an_interruption_and_with_other_workers(tmp_path):
    options = dict(splits=["train800"], limit=16, spec=str(small_shard_spec(tmp_path, 4)), views=2, batch_size=4)
    extract_tiny("digits", tmp_path / "straight", **options)
    with pytest.raises(Interrupted):
        extract_tiny("digits", tmp_path / "resumed", progress=InterruptAfter(images=6), **options)
    extract_tiny("digits", tmp_path / "resumed", workers=1, **options)  # decoding in a worker process now
    assert_same_store(tmp_path / "straight", tmp_path / "resumed")
    assert sidetune.open_cache(tmp_path / "resumed").split("train800").view_count == 2


def test_only_the_training_images_have_views_and_the_plan_counts_them(viewed, tmp_path):
    splits = viewed.splits
    assert splits["train800val200"].view_count == 3 and splits["test"].kind == "live"
    assert viewed.manifest["views"]["splits"] == ["train800val200"]
    planned = CliRunner().invoke(app, ["extract", "--model", "test_vit", "--dataset", "digits", "--limit", "8", "--views",
                                       "3", "--out", str(tmp_path / "plan"), "--dry-run"], env={"COLUMNS": "200"})
    assert "stored, 3 augmented views" in planned.output
    from sidetune.extract import plan_extraction

    plain, with_views = (plan_extraction("test_vit", "digits", tmp_path / "p", limit=8, views=v) for v in (0, 3))
    stored = lambda plan: next(s.nbytes for s in plan.splits if s.kind == "stored")  # noqa: E731
    assert stored(with_views) - 16 * 8 == 4 * (stored(plain) - 16 * 8)  # the labels once, the tokens four times


def test_each_epoch_shows_one_view_per_image_drawn_from_the_seed(viewed):
    features = LoadedSplits(viewed, torch.device("cpu")).get_views("train800", [6], 3)
    stored = torch.from_numpy(viewed.split("train800val200").group["views"][:, :, -1:])
    rows = viewed.split("train800").rows
    draws = []
    for seed in (1, 1, 2):
        features.choose_views(torch.Generator().manual_seed(seed))
        tokens, _ = next(features.batches(8))
        choice = features.view_choice[torch.from_numpy(rows)]
        torch.testing.assert_close(tokens, stored[torch.from_numpy(rows), choice])
        draws.append(choice)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_training_draws_from_the_views_and_zero_views_trains_on_the_images(viewed, tmp_path):
    settings = dict(epochs=3, warmup_epochs=1)
    viewed_runs = [train_group(viewed, [TrainConfig.create("linear", **settings)], "train800", "val200", "cpu")[0]
                   for _ in range(2)]
    assert viewed_runs[0].top1 == viewed_runs[1].top1  # reproducible
    [plain] = train_group(viewed, [TrainConfig.create("linear", views=0, **settings)], "train800", "val200", "cpu")
    extract_tiny("digits", tmp_path / "plain", spec=float32_spec(tmp_path), limit=8)
    [reference] = train_group(sidetune.open_cache(tmp_path / "plain"), [TrainConfig.create("linear", **settings)],
                              "train800", "val200", "cpu")
    losses = lambda result: [row["loss"] for row in result.history]  # noqa: E731
    assert plain.top1 == reference.top1 and losses(plain) == losses(reference)
    assert losses(viewed_runs[0]) != losses(plain)
    with pytest.raises(sidetune.SidetuneError, match="--views 5, but the cache stores 3 augmented views"):
        train_group(viewed, [TrainConfig.create("linear", views=5, **settings)], "train800", "val200", "cpu")


def test_int8_views_decode_close_to_the_float_ones(tmp_path, viewed):
    extract_tiny("digits", tmp_path / "int8", spec="int8", limit=8, views=3)
    cache = sidetune.open_cache(tmp_path / "int8")
    codes, scales = cache.split("train800val200").load_views([6])
    decoded = cache.codec.decode_numpy(codes.reshape(-1, *codes.shape[2:]), scales.reshape(-1, *scales.shape[2:]))
    exact = viewed.split("train800val200").group["views"][:, :, -1:].reshape(decoded.shape)
    assert np.abs(decoded - exact).max() < 0.05 * np.abs(exact).max()
    [result] = train_group(cache, [TrainConfig.create("last", {"rank": 4}, epochs=2)], "train800", "val200", "cpu")
    assert result.status == "ok"
