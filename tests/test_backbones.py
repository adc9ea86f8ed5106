"""Any timm backbone with forward_intermediates: the cached tokens are timm's own per-stage
outputs (ViT relatives with register tokens, Swin, ConvNeXt, EfficientNet), stages of
different shapes are stored and read back, and the side networks that can read them train."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import float32_spec
from sidetune.backbones import Preprocessing

# Tiny variants of real architectures, built by timm from a folder's config.json (model_args),
# as `--model local-dir:FOLDER` loads them.
TINY_SWIN = ("swin_tiny_patch4_window7_224",
             {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "img_size": 64, "window_size": 4})
TINY_DINOV2_REG = ("vit_small_patch14_reg4_dinov2", {"depth": 3, "embed_dim": 32, "num_heads": 2, "img_size": 56})
TINY_EVA = ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 56})


def local_model(folder, architecture: str, model_args: dict, seed: int = 0) -> str:
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    save_for_hf(model, str(folder), model_args=model_args)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, model_args["img_size"], model_args["img_size"]]
    (folder / "config.json").write_text(json.dumps(config))
    return f"local-dir:{folder}"


def timm_outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """timm's own per-stage outputs as (B, T, D) tokens, prefix tokens first."""
    if hasattr(model, "num_prefix_tokens"):
        outputs = model.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        return [torch.cat([prefix, patches], 1) for patches, prefix in outputs]
    return [x.flatten(2).transpose(1, 2) for x in model.forward_intermediates(images, intermediates_only=True)]


def cached_and_timm(model_name: str, folder, tmp_path, **spec_fields):
    sidetune.extract(model_name, str(folder), tmp_path / "cache", spec=float32_spec(tmp_path, **spec_fields),
                     pretrained=False, workers=0, batch_size=3)
    cache = sidetune.open_cache(tmp_path / "cache")
    split = cache.split("train")
    backbone = sidetune.backbones.load_recorded_backbone(cache.manifest["backbone"])
    transform = Preprocessing.from_record(cache.manifest["preprocessing"]).transform()
    images = torch.stack([transform(image) for image in _images(cache, "train")])
    with torch.inference_mode():
        expected = timm_outputs(backbone.model, images)
        final = backbone.model.forward_features(images)
    stored = [torch.from_numpy(x) for x in _unpack(split)]
    return cache, stored, expected, final


def _images(cache, split):
    from sidetune.datasets import load_source

    images = load_source(cache.manifest["dataset"]["argument"], splits=[split]).splits[split]
    return [images.image(i) for i in range(len(images))]


def _unpack(split):
    tokens = torch.from_numpy(split.load())
    return [x.numpy() for x in split.layout.unpack(tokens, split.stages)]


def assert_tokens_equal(stored: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(stored, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.fixture
def folder(tmp_path):
    from conftest import write_image

    root = tmp_path / "images"
    for index in range(6):
        write_image(root / "train" / f"class{index % 2}" / f"{index}.png", seed=index, size=40)
    return root


def test_a_vit_with_register_tokens_caches_timms_block_outputs_with_every_prefix_token(folder, tmp_path):
    model = local_model(tmp_path / "dinov2", *TINY_DINOV2_REG)
    cache, stored, expected, _ = cached_and_timm(model, folder, tmp_path)
    assert cache.manifest["backbone"]["num_prefix_tokens"] == 5  # CLS and 4 registers, counted from the model
    assert cache.split("train").stages == [0, 1, 2, 3]
    for block, tokens in enumerate(expected, start=1):
        assert_tokens_equal(stored[block], tokens)


def test_an_eva_caches_timms_block_outputs_from_stage_1(folder, tmp_path):
    cache, stored, expected, _ = cached_and_timm(local_model(tmp_path / "eva", *TINY_EVA), folder, tmp_path)
    assert cache.manifest["backbone"]["path"] == "intermediates" and cache.split("train").stages == [1, 2]
    for tokens, reference in zip(stored, expected):
        assert_tokens_equal(tokens, reference)


def test_a_swin_caches_each_stage_as_its_grid_of_tokens_with_its_own_width(folder, tmp_path):
    cache, stored, expected, _ = cached_and_timm(local_model(tmp_path / "swin", *TINY_SWIN), folder, tmp_path)
    shapes = cache.manifest["layout"]["stage_shapes"]
    assert [(s["num_tokens"], s["width"], s["grid"]) for s in shapes] == [
        (256, 16, [16, 16]), (64, 32, [8, 8]), (16, 64, [4, 4]), (4, 128, [2, 2])]
    assert len(stored) == len(expected) == 4
    for tokens, reference in zip(stored, expected):
        assert_tokens_equal(tokens, reference)
    assert cache.final_norm() is not None  # Swin's final LayerNorm, applied by stage two


def test_a_convnext_caches_timms_stage_outputs(folder, tmp_path):
    cache, stored, expected, _ = cached_and_timm("test_convnext", folder, tmp_path)
    assert cache.split("train").stored.tokens.ndim == 2  # stages of different shapes: one flat vector per image
    for tokens, reference in zip(stored, expected, strict=True):
        assert_tokens_equal(tokens, reference)


def test_an_efficientnet_caches_its_stages_and_then_the_features_its_classifier_reads(folder, tmp_path):
    cache, stored, expected, final = cached_and_timm("test_efficientnet", folder, tmp_path)
    assert len(stored) == len(expected) + 1
    for tokens, reference in zip(stored, expected):
        assert_tokens_equal(tokens, reference)
    assert_tokens_equal(stored[-1], final.flatten(2).transpose(1, 2))  # after conv_head: 256 channels
    assert cache.manifest["layout"]["width"] == final.shape[1]


def test_max_grid_average_pools_large_grids_and_keeps_small_ones(folder, tmp_path):
    cache, stored, expected, _ = cached_and_timm("test_convnext", folder, tmp_path, max_grid=7)
    for tokens, reference in zip(stored, expected):
        side = int(reference.shape[1] ** 0.5)
        grid = reference.transpose(1, 2).reshape(len(reference), -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid, (min(side, 7), min(side, 7))).flatten(2).transpose(1, 2)
        assert_tokens_equal(tokens, pooled)
    assert [s["grid"] for s in cache.manifest["layout"]["stage_shapes"]] == [[7, 7], [7, 7], [7, 7], [5, 5]]


def test_keeping_the_last_stages_of_a_cnn_stores_only_those(folder, tmp_path):
    sidetune.extract("test_resnet", str(folder), tmp_path / "cache", spec="cnn-last2", pretrained=False, workers=0)
    cache = sidetune.open_cache(tmp_path / "cache")
    assert cache.split("train").stages == [4, 5]
    assert cache.split("trainval").tokens.shape == (6, 49 * 192 + 25 * 96)  # train and its carved val, stored once


def test_an_int8_spec_is_refused_for_stages_of_different_shapes(folder, tmp_path):
    with pytest.raises(sidetune.SidetuneError, match="int8.*same tokens and width.*--spec final"):
        sidetune.extract("test_convnext", str(folder), tmp_path / "cache", spec="int8", pretrained=False, workers=0)


@pytest.fixture(scope="module")
def convnext_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("convnext") / "cache"
    sidetune.extract("test_convnext", "digits", out, spec="cnn-grid7", splits=["train800", "val200"], limit=200,
                     pretrained=False, workers=0)
    return out


@pytest.mark.parametrize("method, options", [("linear", ["--pool", "mean"]), ("ridge", ["--pool", "mean"]),
                                             ("attentive", ["--lr", "0.01", "--epochs", "10"]),
                                             ("head2toe", ["--pool", "mean"])])
def test_probes_train_from_a_cnn_cache_through_the_cli(convnext_digits, tmp_path, method, options):
    result = CliRunner().invoke(app, ["train", "--cache", str(convnext_digits), "--method", method, "--epochs", "3",
                                      "--train-split", "train800", "--eval-split", "val200",
                                      "--out", str(tmp_path / "run"), *options])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["top1"] > 20.0  # 10 classes: well above chance from random ConvNeXt features


def test_pool_auto_is_the_patch_mean_on_a_cnn_and_cls_on_a_vit_and_is_recorded(convnext_digits, tmp_path):
    from conftest import config

    for cache, expected in ((convnext_digits, "mean"), (None, "cls")):
        if cache is None:
            cache = tmp_path / "vit"
            sidetune.extract("test_vit", "digits", cache, splits=["train800", "val200"], limit=64, pretrained=False,
                             workers=0)
        run_dir, result = sidetune.train(cache, config("linear", epochs=1), out=tmp_path / f"run-{expected}",
                                         train_split="train800", eval_split="val200")
        assert dict(result.config.options)["pool"] == expected and result.status == "ok"
        assert json.loads((run_dir / "metrics.json").read_text())["pool"] == expected


def test_head2toe_on_a_cnn_reads_every_stage_at_its_own_width(convnext_digits):
    from sidetune.training import sidenet_blueprint

    net = sidenet_blueprint(sidetune.open_cache(convnext_digits), "head2toe", {"pool": "mean"}).build(2)
    assert net.stage_widths == [24, 32, 48, 64] and net.head_weight.shape == (2, 168, 10)


@pytest.mark.parametrize("method", ["last", "losa", "mist", "lst"])
def test_side_networks_adding_stages_train_from_a_cnn_cache_through_the_cli(convnext_digits, tmp_path, method):
    result = CliRunner().invoke(app, ["train", "--cache", str(convnext_digits), "--method", method, "--pool", "mean",
                                      "--lr", "0.01", "--epochs", "10", "--train-split", "train800",
                                      "--eval-split", "val200", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["top1"] > 20.0


def test_stage_embeddings_map_narrower_stages_isometrically_onto_the_last_stages_width(convnext_digits):
    from sidetune.training import sidenet_blueprint

    net = sidenet_blueprint(sidetune.open_cache(convnext_digits), "last", {"pool": "mean"}).build(1)
    assert net.stage_embedding_4 is None  # the last stage is read as it is
    for stage, width in ((1, 24), (2, 32), (3, 48)):
        matrix = getattr(net, f"stage_embedding_{stage}")
        assert matrix.shape == (width, 64)
        torch.testing.assert_close(matrix @ matrix.T, torch.eye(width), atol=1e-5, rtol=0)


def test_last_on_a_cnn_is_last_on_each_stage_resampled_to_the_last_grid_and_embedded(convnext_digits):
    """The extension as written in docs/methods.md: the same LAST, given by hand the stages
    average-pooled to the last stage's grid and multiplied by their embeddings, gives the same logits."""
    from sidetune.sidenets import FeatureLayout, create_sidenet
    from sidetune.training import sidenet_blueprint
    from sidetune.training.data import load_features

    cache = sidetune.open_cache(convnext_digits)
    net = sidenet_blueprint(cache, "last", {"pool": "mean", "rank": 4}).build(2)
    net.reset_parameters([0, 1])
    with torch.no_grad():
        for name, parameter in net.named_parameters():  # non-zero outputs, so that every stage matters
            parameter.add_(0.05 * torch.randn_like(parameter))
    split = cache.split("val200")
    stored = [torch.from_numpy(x).float()[:8] for x in _unpack(split)]
    by_hand = []
    for shape, tokens in zip(split.layout.shapes, stored):
        grid = tokens.transpose(1, 2).reshape(8, shape.width, *shape.grid)
        pooled = F.adaptive_avg_pool2d(grid, (5, 5)).flatten(2).transpose(1, 2)
        matrix = getattr(net, f"stage_embedding_{shape.stage}")
        by_hand.append(pooled if matrix is None else pooled @ matrix)
    uniform = create_sidenet("last", FeatureLayout(depth=4, width=64, num_tokens=25, num_prefix_tokens=0,
                                                   num_classes=10, stages=(1, 2, 3, 4), token_selection="all",
                                                   first_stage=1), 2, pool="mean", rank=4)
    uniform.set_final_norm(None, None, 0.0)
    uniform.load_state_dict(net.state_dict(), strict=False)
    features = load_features(cache, "val200", net.stages_needed(), torch.device("cpu"))
    batch = next(features.batches(8))[0]
    torch.testing.assert_close(net(batch), uniform(torch.stack(by_hand, 1)), rtol=1e-4, atol=1e-4)


def test_last_and_losa_train_on_a_vit_relative_without_stage_0_starting_from_stage_1(folder, tmp_path):
    from sidetune.training import sidenet_blueprint, train_group

    sidetune.extract(local_model(tmp_path / "eva", *TINY_EVA), str(folder), tmp_path / "cache", pretrained=False, workers=0)
    cache = sidetune.open_cache(tmp_path / "cache")
    assert sidenet_blueprint(cache, "last", {}).build(1).stages_needed() == [1, 2]
    for method in ("last", "losa"):  # six images: it must fit them, scored on the images it trained on
        [result] = train_group(cache, [sidetune.TrainConfig.create(method, epochs=30, lr=1e-2, batch_size=6)],
                               "train", "train", "cpu")
        assert result.status == "ok" and result.epoch_losses[-1] < 0.5 * result.epoch_losses[0], method
        assert result.top1 == 100.0, method


def test_a_method_the_cache_cannot_serve_is_refused_naming_float_specs_and_the_methods_that_can(folder, tmp_path):
    from sidetune.training import sidenet_blueprint

    sidetune.extract("test_convnext", str(folder), tmp_path / "cache", spec="mean", pretrained=False, workers=0)
    with pytest.raises(sidetune.SidetuneError,
                       match=r"--spec default \(or cnn-grid7\), or train a method that reads this cache: linear, ridge, knn, head2toe\."):
        sidenet_blueprint(sidetune.open_cache(tmp_path / "cache"), "last", {"pool": "mean"}).build(1)


def test_a_cnn_run_scores_its_live_test_split_and_predicts_the_logits_its_cache_gives(tmp_path, vtab_folder):
    """A VTAB-style folder through a ConvNeXt: test left live, scored through the backbone at
    the end of training, and `predict` on the test images matches the side network on a cached copy."""
    from conftest import assert_live_run_predicts_its_cached_logits, config

    assert_live_run_predicts_its_cached_logits("test_convnext", "cnn-grid7", vtab_folder, tmp_path,
                                               config("last", epochs=2, rank=4, pool="mean"))


def test_stacked_side_networks_on_a_cnn_cache_train_as_they_do_alone(convnext_digits):
    from conftest import config
    from sidetune.training import train_group

    configs = [config("last", epochs=2, lr=lr, rank=4, pool="mean") for lr in (0.01, 0.003)]
    cache = sidetune.open_cache(convnext_digits)
    stacked = train_group(cache, configs, "train800", "val200", "cpu")
    alone = [train_group(cache, [c], "train800", "val200", "cpu")[0] for c in configs]
    for together, single in zip(stacked, alone):
        assert together.top1 == single.top1
        torch.testing.assert_close(together.state["head_weight"], single.state["head_weight"], rtol=1e-4, atol=1e-5)


def test_a_sweep_over_a_cnn_cache_runs_from_the_command_line(convnext_digits, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--cache", str(convnext_digits), "--method", "losa", "--pool", "mean",
                                      "--lr", "0.01,0.003", "--epochs", "2", "--protocol", "none", "--train-split",
                                      "train800", "--eval-split", "val200", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["ok", "ok"]


def test_a_cnn_split_streamed_by_shard_gives_the_resident_batches(convnext_digits):
    from sidetune.training.data import StreamedFeatures, load_features

    cache = sidetune.open_cache(convnext_digits)
    streamed = load_features(cache, "train800", [3, 4], torch.device("cpu"), budget_bytes=50_000)
    resident = load_features(cache, "train800", [3, 4], torch.device("cpu"))
    assert isinstance(streamed, StreamedFeatures) and streamed.sample_shape == (49 * 48 + 25 * 64,)
    assert torch.equal(torch.cat([t for t, _ in streamed.batches(32)]), torch.cat([t for t, _ in resident.batches(32)]))


@pytest.mark.parametrize("family, wrapped", [("test_vit", False), ("test_convnext", True), ("test_resnet", False),
                                             ("test_efficientnet", True)])
def test_weights_saved_as_timm_saves_them_classifier_and_all_load_with_a_note(family, wrapped, folder, tmp_path):
    from sidetune.backbones import state_dict_sha256

    torch.manual_seed(5)
    full = timm.create_model(family, pretrained=False)  # with its classifier, as a user's checkpoint has it
    state = full.state_dict()
    if wrapped:  # as a training script saves it: nested, with DataParallel's prefix
        state = {"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "checkpoint.pth")
    notes = []
    sidetune.extract(family, str(folder), tmp_path / "cache", spec="final", weights=tmp_path / "checkpoint.pth",
                     workers=0, log=notes.append)
    headless = timm.create_model(family, pretrained=False, num_classes=0)
    headless.load_state_dict(full.state_dict(), strict=False)  # every key but the classifier's
    assert sidetune.open_cache(tmp_path / "cache").manifest["backbone"]["weights_sha256"] == state_dict_sha256(headless)
    classifier = timm.create_model(family, pretrained=False).pretrained_cfg["classifier"]
    assert any("left out the checkpoint's classifier" in note and f"{classifier}." in note for note in notes), notes
    assert any("under 'state_dict'" in note for note in notes) == wrapped


def test_a_weights_file_holding_no_state_dict_is_refused_in_one_paragraph(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "odd.pth")
    with pytest.raises(sidetune.SidetuneError, match="holds no state dict of tensors.*Save the model's state_dict"):
        sidetune.extract("test_vit", "digits", tmp_path / "cache", weights=tmp_path / "odd.pth", limit=2)
