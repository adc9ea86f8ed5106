"""Stage one as a user runs it: shapes, labels, class names and the numbers in the cache."""

import numpy as np
import torch

import sidetune
from conftest import TINY_MODEL, extract_tiny, tiny_vit
from sidetune.backbones import Preprocessing


def preprocess_split(cache, split_name, source_split):
    transform = Preprocessing.from_record(cache.manifest["preprocessing"]).transform()
    return torch.stack([transform(source_split.image(i)) for i in range(len(source_split))])


def test_class_folder_gives_seeded_train_test_split_with_class_names(class_folder, tmp_path):
    extract_tiny(class_folder, tmp_path / "cache")
    cache = sidetune.open_cache(tmp_path / "cache")
    assert cache.class_names == ["circle", "square", "triangle"]
    assert list(cache.splits) == ["train", "val", "trainval", "test"]
    trainval, test = cache.split("trainval"), cache.split("test")
    assert trainval.num_images + test.num_images == 15
    assert sorted(np.bincount(test.labels).tolist()) == [1, 1, 1]  # stratified 20% of 5 per class
    assert trainval.tokens.shape == (trainval.num_images, 7, 101, 64)  # test_vit: 6 blocks, 1 + 10x10 tokens
    assert trainval.complete and test.complete


def test_vtab_folder_reads_the_four_list_files(vtab_folder, tmp_path):
    extract_tiny(vtab_folder, tmp_path / "cache")
    cache = sidetune.open_cache(tmp_path / "cache")
    sizes = {name: split.num_images for name, split in cache.splits.items()}
    assert sizes == {"train800": 12, "val200": 4, "train800val200": 16, "test": 6}
    assert cache.split("test").labels.tolist() == [i % 4 for i in range(6)]
    assert cache.manifest["dataset"]["source"].startswith("vtab-folder:")


def test_vtab_task_name_reads_the_data_root_folder_with_catalogue_classes(vtab_folder, tmp_path):
    vtab_folder.rename(tmp_path / "dtd")
    extract_tiny("dtd", tmp_path / "cache", data_root=tmp_path, splits=["test"])
    cache = sidetune.open_cache(tmp_path / "cache")
    assert len(cache.class_names) == 47 and cache.class_names[0] == "banded"
    assert cache.manifest["dataset"]["vtab_group"] == "natural"
    assert list(cache.splits) == ["test"]


def test_digits_has_vtab_shaped_splits_and_matching_labels(tmp_path):
    from sidetune.datasets import load_source

    extract_tiny("digits", tmp_path / "cache", splits=["val200"], spec="cls")
    cache = sidetune.open_cache(tmp_path / "cache")
    source = load_source("digits")
    assert {name: len(s) for name, s in source.splits.items()} == {
        "train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    assert cache.split("val200").tokens.shape == (200, 7, 1, 64)
    np.testing.assert_array_equal(cache.split("val200").labels, source.splits["val200"].labels)


def test_every_stored_stage_equals_the_backbone_block_outputs(class_folder, tmp_path, tiny_weights):
    from sidetune.datasets import load_source

    extract_tiny(class_folder, tmp_path / "cache", weights=tiny_weights, splits=["test"], precision="fp32")
    cache = sidetune.open_cache(tmp_path / "cache")
    images = preprocess_split(cache, "test", load_source(str(class_folder)).splits["test"])
    model = tiny_vit()
    captured = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model.forward_features(images)
    stored = torch.from_numpy(cache.split("test").load().astype(np.float32))
    for stage, expected in enumerate(captured):
        torch.testing.assert_close(stored[:, stage], expected, atol=2e-3, rtol=2e-3)


def test_bf16_extraction_stays_within_bf16_rounding_of_fp32(class_folder, tmp_path, tiny_weights):
    """bf16 autocast is the default on a GPU: every stage within a few bf16 ulps of fp32."""
    for precision in ("fp32", "bf16"):
        extract_tiny(class_folder, tmp_path / precision, weights=tiny_weights, splits=["test"], precision=precision)
    exact, rounded = (sidetune.open_cache(tmp_path / p).split("test").load().astype(np.float32) for p in ("fp32", "bf16"))
    assert not np.array_equal(exact, rounded)  # bf16 really ran
    for stage in range(exact.shape[1]):
        error = np.linalg.norm(rounded[:, stage] - exact[:, stage]) / np.linalg.norm(exact[:, stage])
        assert error < 2e-2, (stage, error)


def test_last_stage_after_stored_final_norm_equals_forward_features(class_folder, tmp_path, tiny_weights):
    from sidetune.datasets import load_source

    extract_tiny(class_folder, tmp_path / "cache", weights=tiny_weights, splits=["test"])
    cache = sidetune.open_cache(tmp_path / "cache")
    images = preprocess_split(cache, "test", load_source(str(class_folder)).splits["test"])
    with torch.no_grad():
        expected = tiny_vit().forward_features(images)
    norm = cache.final_norm()
    last = torch.from_numpy(cache.split("test").load(stages=[6])[:, 0].astype(np.float32))
    normed = torch.nn.functional.layer_norm(
        last, (64,), torch.from_numpy(norm["weight"]), torch.from_numpy(norm["bias"]), norm["eps"])
    torch.testing.assert_close(normed, expected, atol=1e-2, rtol=1e-2)


def test_spec_keeps_every_gth_stage_and_mean_tokens(class_folder, tmp_path):
    spec_file = tmp_path / "gap3mean.yaml"
    spec_file.write_text("stages: {every: 3}\ntokens: mean\ndtype: float32\nshard_images: 4\n")
    extract_tiny(class_folder, tmp_path / "cache", spec=str(spec_file), splits=["train"])
    full_out = tmp_path / "full"
    extract_tiny(class_folder, full_out, splits=["train"])
    small = sidetune.open_cache(tmp_path / "cache").split("train")
    full = sidetune.open_cache(full_out).split("train")
    assert small.stages == [0, 3, 6] and small.tokens.dtype == np.float32
    expected = full.load(stages=[0, 3, 6]).astype(np.float32)[:, :, 1:].mean(axis=2)
    np.testing.assert_allclose(small.load()[:, :, 0], expected, atol=2e-3)


def test_limit_takes_the_first_images_of_each_split(tmp_path):
    extract_tiny("digits", tmp_path / "cache", splits=["test", "val200"], limit=10, spec="cls")
    cache = sidetune.open_cache(tmp_path / "cache")
    assert [s.num_images for s in cache.splits.values()] == [10, 10]
    assert cache.manifest["dataset"]["limit"] == 10


def test_local_dir_model_loads_timm_saved_folder(class_folder, tmp_path):
    from timm.models import save_for_hf

    save_for_hf(tiny_vit(seed=3), str(tmp_path / "model"))
    sidetune.extract(f"local-dir:{tmp_path / 'model'}", str(class_folder), tmp_path / "cache",
                     splits=["test"], workers=0, spec="final")
    cache = sidetune.open_cache(tmp_path / "cache")
    assert cache.manifest["backbone"]["weights_source"].startswith("local-dir:")
    assert cache.split("test").stages == [6]
    from sidetune.backbones import state_dict_sha256

    assert cache.manifest["backbone"]["weights_sha256"] == state_dict_sha256(tiny_vit(seed=3))


def test_saved_hub_dataset_folder_is_read_with_its_class_labels(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog"])})
    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images[:4], "kind": [0, 1, 1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"img": images[4:], "kind": [1, 0]}, features=features),
    })
    saved.save_to_disk(str(tmp_path / "pets"))
    extract_tiny(tmp_path / "pets", tmp_path / "cache", spec="cls")
    cache = sidetune.open_cache(tmp_path / "cache")
    assert cache.class_names == ["cat", "dog"]
    assert cache.split("train").labels.tolist() == [0, 1, 1, 0]
    assert cache.split("test").labels.tolist() == [1, 0]


def test_manifest_records_backbone_preprocessing_and_statistics(class_folder, tmp_path):
    extract_tiny(class_folder, tmp_path / "cache", preprocess="inception", splits=["test"])
    manifest = sidetune.open_cache(tmp_path / "cache").manifest
    assert manifest["preprocessing"] == {
        "name": "inception", "size": [160, 160], "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": None, "crop_mode": None}
    assert manifest["backbone"]["depth"] == 6 and manifest["backbone"]["num_prefix_tokens"] == 1
    assert manifest["layout"]["stages"] == list(range(7))
    absmax = manifest["splits"]["test"]["absmax"]
    assert len(absmax) == 7 and all(value > 0 for value in absmax)
    assert torch.__version__.startswith(manifest["versions"]["torch"])
    assert {"timm", "zarr", "python"} <= set(manifest["versions"])


def save_original_vit_npz(model, path) -> None:
    """Write a timm ViT in the original (google-research/vision_transformer) .npz naming."""
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    width = model.embed_dim
    w = {
        "embedding/kernel": p["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": p["patch_embed.proj.bias"],
        "cls": p["cls_token"],
        "Transformer/posembed_input/pos_embedding": p["pos_embed"],
        "Transformer/encoder_norm/scale": p["norm.weight"],
        "Transformer/encoder_norm/bias": p["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, out = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w = p[b + "attn.qkv.weight"].reshape(3, width, width)
        qkv_b = p[b + "attn.qkv.bias"].reshape(3, heads, width // heads)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{out}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].T.reshape(width, heads, -1)
            w[f"{out}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j]
        w[f"{out}MultiHeadDotProductAttention_1/out/kernel"] = (
            p[b + "attn.proj.weight"].reshape(width, heads, -1).transpose(1, 2, 0))
        w[f"{out}MultiHeadDotProductAttention_1/out/bias"] = p[b + "attn.proj.bias"]
        for norm, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            w[f"{out}{name}/scale"], w[f"{out}{name}/bias"] = p[b + norm + ".weight"], p[b + norm + ".bias"]
        for r in range(2):
            w[f"{out}MlpBlock_3/Dense_{r}/kernel"] = p[b + f"mlp.fc{r + 1}.weight"].T
            w[f"{out}MlpBlock_3/Dense_{r}/bias"] = p[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_original_npz_weights_load_to_the_same_backbone(tmp_path):
    from sidetune.backbones import load_backbone, state_dict_sha256

    save_original_vit_npz(tiny_vit(seed=5), tmp_path / "vit.npz")
    backbone = load_backbone(TINY_MODEL, weights=tmp_path / "vit.npz")
    assert backbone.weights_sha256 == state_dict_sha256(tiny_vit(seed=5))
    assert backbone.weights_source == f"file:{tmp_path / 'vit.npz'}"
