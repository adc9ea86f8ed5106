"""What a cache stores and how it is kept: each image once (views), VTAB-1k's test split left
to live evaluation, int8 tokens, the plan against free space, and format-1 caches still read."""

import json

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import config, device_under_test, extract_tiny
from sidetune.cache.manifest import MANIFEST_FILE
from sidetune.training import sidenet_blueprint, train_group
from sidetune.training.data import LoadedSplits, load_features
from sidetune.training.scoring import predicted_classes

ALL_VTAB = ["train800", "val200", "train800val200", "test"]


@pytest.fixture(scope="module")
def digits_default(tmp_path_factory):
    """digits as extract caches it by default: train800val200 stored, train800 and val200 as
    its rows, test live."""
    out = tmp_path_factory.mktemp("storage") / "digits"
    extract_tiny("digits", out, limit=96)
    return sidetune.open_cache(out)


@pytest.fixture(scope="module")
def digits_test_cached(tmp_path_factory):
    """The same digits splits with test cached too (named in --splits)."""
    out = tmp_path_factory.mktemp("storage") / "digits-test-cached"
    extract_tiny("digits", out, limit=96, splits=ALL_VTAB)
    return sidetune.open_cache(out)


def test_vtab_splits_store_each_training_image_once_and_leave_test_live(digits_default):
    kinds = {name: split.kind for name, split in digits_default.splits.items()}
    assert kinds == {"train800": "view", "val200": "view", "train800val200": "stored", "test": "live"}
    assert digits_default.split("train800val200").tokens.shape[0] == 96 + 96
    assert digits_default.split("train800").parent.name == "train800val200"
    assert "tokens" not in zarr.open_group(str(digits_default.path) + "/test", mode="r")


@pytest.mark.parametrize("split", ["train800", "val200"])
def test_a_view_reads_the_very_tokens_and_labels_a_stored_copy_holds(digits_default, tmp_path, split):
    extract_tiny("digits", tmp_path / "alone", limit=96, splits=[split])  # alone, the split is stored
    stored = sidetune.open_cache(tmp_path / "alone").split(split)
    assert stored.kind == "stored"
    np.testing.assert_array_equal(digits_default.split(split).load(), stored.load())
    np.testing.assert_array_equal(digits_default.split(split).labels, stored.labels)


def test_views_share_their_parents_device_memory(digits_default, device):
    loaded = LoadedSplits(digits_default, device)
    train, val = loaded.get("train800", [0, 6]), loaded.get("val200", [0, 6])
    parent = loaded.get("train800val200", [0, 6])
    assert train.codes.data_ptr() == val.codes.data_ptr() == parent.codes.data_ptr()
    assert len(train.labels) == 96 and len(val.labels) == 96


def test_a_streamed_view_evaluates_as_the_resident_one(digits_default, device):
    net = sidenet_blueprint(digits_default, "linear", {}).build(2)
    net.reset_parameters([0, 1])
    net.to(device)
    resident = predicted_classes(net, load_features(digits_default, "val200", [6], device), 16)
    streamed = load_features(digits_default, "val200", [6], device, budget_bytes=10**5)
    assert type(streamed).__name__ == "StreamedFeatures"
    predictions, labels = predicted_classes(net, streamed, 16)
    assert sorted(zip(predictions[0].tolist(), labels.tolist())) == sorted(zip(resident[0][0].tolist(), resident[1].tolist()))


def test_training_on_a_live_split_is_refused_with_the_fix(digits_default):
    with pytest.raises(sidetune.SidetuneError, match="training reads cached splits only.*--splits"):
        train_group(digits_default, [config("linear", epochs=1)], "test", "val200", device_under_test())


def test_live_test_evaluation_gives_the_top1_of_a_cached_test_split(digits_default, digits_test_cached, tmp_path):
    grid = sidetune.expand_grid("last", {"lr": [1e-3, 3e-3]}, {"rank": 4, "epochs": 2, "warmup_epochs": 0})
    live = sidetune.sweep(digits_default, grid, out=tmp_path / "live", top_k=2, device=device_under_test().type)
    cached = sidetune.sweep(digits_test_cached, grid, out=tmp_path / "cached", top_k=2, device=device_under_test().type)
    finals = [{row.config_id: row.top1 for row in report.rows if row.phase == "final"} for report in (live, cached)]
    assert finals[0] == finals[1] and len(finals[0]) == 2
    assert live.best.top1 == cached.best.top1


def test_evaluate_scores_a_run_on_the_live_test_split_through_the_backbone(digits_default, digits_test_cached, tmp_path):
    run_dir, result = sidetune.train(digits_test_cached, config("linear", epochs=3), out=tmp_path / "run",
                                     device=device_under_test().type)
    assert result.top1 is not None  # trained on train800val200, scored on the cached test
    outcome = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--cache", str(digits_default.path),
                                       "--device", device_under_test().type])
    assert outcome.exit_code == 0, outcome.output
    record = json.loads((run_dir / "eval-test.json").read_text())
    assert record["kind"] == "live" and record["images"] == 96
    assert record["top1"] == pytest.approx(result.top1)


def test_a_live_split_whose_images_changed_is_refused(tmp_path, vtab_folder):
    extract_tiny(vtab_folder, tmp_path / "cache")
    (vtab_folder / "test.txt").write_text((vtab_folder / "test.txt").read_text().replace(" 1\n", " 2\n", 1))
    run_dir, _ = sidetune.train(tmp_path / "cache", config("linear", epochs=1), out=tmp_path / "run",
                                train_split="train800", eval_split="val200", device=device_under_test().type)
    with pytest.raises(sidetune.SidetuneError, match="not those the cache .* recorded"):
        sidetune.evaluate(run_dir, "test", device=device_under_test().type)


def test_int8_tokens_take_half_the_bytes_and_decode_close_to_float16(tmp_path, digits_test_cached):
    for scale in ("channel", "token"):
        spec = tmp_path / f"int8-{scale}.yaml"
        spec.write_text(f"stages: all\ntokens: all\ndtype: int8\nscale: {scale}\n")
        extract_tiny("digits", tmp_path / scale, limit=96, splits=["test"], spec=str(spec))
    exact = digits_test_cached.split("test").load().astype(np.float32)
    for scale in ("channel", "token"):
        cached = sidetune.open_cache(tmp_path / scale).split("test")
        assert cached.tokens.dtype == np.int8 and cached.scales.dtype == np.float32
        decoded = cached.load()
        assert decoded.dtype == np.float16 and decoded.shape == exact.shape
        error = np.linalg.norm(decoded.astype(np.float32) - exact) / np.linalg.norm(exact)
        assert error < 0.02, (scale, error)
        assert cached.nbytes_stored < 0.6 * digits_test_cached.split("test").nbytes_stored


def test_every_codec_decodes_alike_on_device_and_host_and_knows_its_size():
    from sidetune.cache.codec import CODECS, codec_for

    x = torch.randn(3, 2, 5, 8) * 4
    for name in CODECS:
        for scale in ("token", "channel"):
            codec = codec_for(name, scale)
            tokens, scales = codec.encode(x)
            assert tokens.numpy().dtype == np.dtype(codec.stored_dtype)
            decoded = codec.decode(tokens, scales)
            assert decoded.dtype == codec.decoded_dtype
            on_host = codec.decode_numpy(tokens.numpy(), None if scales is None else scales.numpy())
            assert np.array_equal(on_host, decoded.float().numpy().astype(on_host.dtype)), name
            stored = tokens.nbytes + (0 if scales is None else scales.nbytes)
            assert codec.image_nbytes((2, 5, 8)) * 3 == stored, name
            assert (decoded.float() - x).abs().max() <= x.abs().max() * 2 ** -7, name  # within int8's step


def test_a_bfloat16_cache_holds_the_backbones_tokens_rounded_to_bfloat16(tmp_path):
    for dtype in ("float32", "bfloat16"):
        (tmp_path / f"{dtype}.yaml").write_text(f"stages: all\ntokens: all\ndtype: {dtype}\n")
        extract_tiny("digits", tmp_path / dtype, limit=32, splits=["test"], spec=str(tmp_path / f"{dtype}.yaml"))
    exact = sidetune.open_cache(tmp_path / "float32").split("test").load()
    cached = sidetune.open_cache(tmp_path / "bfloat16")
    rounded = torch.from_numpy(exact).to(torch.bfloat16)
    assert np.array_equal(cached.split("test").load(), rounded.float().numpy())  # read on the host as float32
    features = load_features(cached, "test", cached.split("test").stages, device_under_test())
    assert features.tokens.dtype == torch.bfloat16 and torch.equal(features.tokens.cpu(), rounded)
    wide = sidetune.open_cache(tmp_path / "float32").split("test")
    assert cached.split("test").image_nbytes() * 2 == wide.image_nbytes()
    assert cached.split("test").nbytes_stored < 0.51 * wide.nbytes_stored


def test_a_side_network_trains_from_int8_tokens_as_from_float16(tmp_path, digits_cache):
    extract_tiny("digits", tmp_path / "c", splits=["train800", "val200"], spec="int8")
    cache = sidetune.open_cache(tmp_path / "c")
    assert cache.manifest["spec"]["dtype"] == "int8"
    features = load_features(cache, "val200", [6], device_under_test())
    assert features.codes.dtype == torch.int8 and features.tokens.dtype == torch.float16  # decoded on the device
    probe = config("linear", epochs=30, lr=0.3)
    [int8] = train_group(cache, [probe], "train800", "val200", device_under_test())
    [float16] = train_group(digits_cache, [probe], "train800", "val200", device_under_test())
    assert int8.top1 > 50.0 and abs(int8.top1 - float16.top1) <= 5.0, (int8.top1, float16.top1)  # 200 images: 1 = 0.5 points


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    outcome = CliRunner().invoke(app, ["extract", "--model", "test_vit", "--dataset", "digits", "--out",
                                       str(tmp_path / "c"), "--dry-run"], terminal_width=200)
    assert outcome.exit_code == 0, outcome.output
    for text in ("train800val200", "rows of train800val200", "live", "free at"):
        assert text in outcome.output
    assert not (tmp_path / "c").exists()


def test_plan_counts_the_training_images_once():
    plan = sidetune.plan_extraction("test_vit", "digits", "unused", spec="default")
    sizes = {split.name: split.nbytes for split in plan.splits}
    per_image = 7 * 101 * 64 * 2
    assert sizes["train800val200"] == 1000 * (per_image + 8)
    assert sizes["train800"] == 800 * 16 and sizes["val200"] == 200 * 16 and sizes["test"] == 797 * 8


def test_a_format_1_cache_is_still_read_and_trains(tmp_path):
    extract_tiny("digits", tmp_path / "old", splits=["train800", "val200"], limit=64)  # disjoint: both stored
    manifest = json.loads((tmp_path / "old" / MANIFEST_FILE).read_text())
    for record in manifest["splits"].values():
        record.pop("kind")
    root = zarr.open_group(str(tmp_path / "old"), mode="r+")
    root.attrs["sidetune"] = {**manifest, "format_version": 1}  # where format 1 kept the whole manifest
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    cache = sidetune.open_cache(tmp_path / "old")
    assert cache.manifest["format_version"] == 1 and cache.split("val200").kind == "stored"
    [result] = train_group(cache, [config("linear", epochs=2)], "train800", "val200", device_under_test())
    assert result.status == "ok"


def test_a_spec_without_the_newer_options_records_itself_as_caches_written_before_them():
    from sidetune.cache.spec import load_spec

    assert set(load_spec("default").describe()) == {"name", "stages", "tokens", "dtype", "scale", "chunk_images",
                                                    "shard_images", "compressor", "description"}
    assert load_spec("cnn-grid7").describe()["max_grid"] == 7


def test_shared_images_are_counted_exactly_through_views(digits_default):
    sizes = {name: digits_default.split(name).num_images for name in ("train800val200", "train800", "val200")}
    assert digits_default.shared_images("train800val200", "val200") == sizes["val200"]
    assert digits_default.shared_images("val200", "train800val200") == sizes["val200"]
    assert digits_default.shared_images("train800", "val200") == 0
    assert digits_default.shared_images("train800", "train800") == sizes["train800"]
    assert digits_default.shared_images("train800val200", "test") == 0  # live: its images are not in the cache


def test_training_and_scoring_on_overlapping_splits_warns_and_is_recorded(digits_default, tmp_path):
    heard = []
    run_dir, _ = sidetune.train(digits_default, config("linear", epochs=1), out=tmp_path / "run",
                                train_split="train800val200", eval_split="val200", warn=heard.append,
                                device=device_under_test().type)
    val200 = digits_default.split("val200").num_images
    assert len(heard) == 1 and f"{val200} of the {val200} images of val200 are in the training split" in heard[0]
    assert json.loads((run_dir / "metrics.json").read_text())["eval_images_seen_in_training"] == val200
    heard.clear()
    record = sidetune.evaluate(run_dir, "train800", warn=heard.append, device=device_under_test().type)
    assert record["images_seen_in_training"] == digits_default.split("train800").num_images and len(heard) == 1
    held_out = sidetune.evaluate(run_dir, "test", warn=heard.append, device=device_under_test().type)
    assert held_out["images_seen_in_training"] == 0 and len(heard) == 1


def test_the_command_line_prints_the_overlap_warning(digits_default, tmp_path):
    outcome = CliRunner().invoke(app, ["train", "--cache", str(digits_default.path), "--method", "linear", "--epochs", "1",
                                       "--train-split", "train800val200", "--eval-split", "val200",
                                       "--out", str(tmp_path / "run"), "--device", device_under_test().type],
                                 env={"COLUMNS": "200"})
    assert outcome.exit_code == 0, outcome.output
    assert "warning:" in outcome.output and "not a held-out score" in outcome.output


def test_the_eval_every_refusal_suggests_a_split_the_training_split_does_not_hold(digits_default):
    with pytest.raises(sidetune.SidetuneError, match="does not contain \\(--eval-split train800\\)"):
        train_group(digits_default, [config("linear", epochs=1)], "val200", "test", device_under_test(), eval_every=1)
    with pytest.raises(sidetune.SidetuneError, match="--train-split train800 --eval-split val200"):
        train_group(digits_default, [config("linear", epochs=1)], "train800val200", "test", device_under_test(),
                    eval_every=1)
