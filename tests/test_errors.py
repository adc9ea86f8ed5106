"""Bad input gets one clear paragraph naming the thing and the fix."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import sidetune
from conftest import extract_tiny, python_path, tiny_vit, write_image
from sidetune import SidetuneError


def test_unknown_model_lists_the_aliases(tmp_path):
    with pytest.raises(SidetuneError, match="Unknown model 'vit_b61'.*vit_b16.*vit_g14") as error:
        extract_tiny("digits", tmp_path / "cache", model="vit_b61")
    assert "vit_b16" in str(error.value)


def test_unknown_dataset_lists_the_choices(tmp_path):
    with pytest.raises(SidetuneError, match="Unknown dataset 'dtdd'.*dtd.*sun397.*digits.*hf:org/name"):
        extract_tiny("dtdd", tmp_path / "cache")


def test_unknown_spec_lists_the_specs(tmp_path):
    with pytest.raises(SidetuneError, match="Unknown cache spec 'gap7'.*default.*gap2"):
        extract_tiny("digits", tmp_path / "cache", spec="gap7")


def test_missing_split_lists_the_splits_present(tmp_path):
    with pytest.raises(SidetuneError, match="no split validation; it has train800, val200, train800val200, test"):
        extract_tiny("digits", tmp_path / "cache", splits=["validation"])


def test_unreadable_image_is_named_even_from_a_worker_process(class_folder, tmp_path):
    broken = class_folder / "square" / "3.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(SidetuneError, match=r"Could not read image .*square/3\.png"):
        extract_tiny(class_folder, tmp_path / "cache", workers=1)


def test_unwritable_output_fails_before_the_model_is_even_resolved(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SidetuneError, match="Cannot write the cache to .*a-file/cache"):
        extract_tiny("digits", blocker / "cache", model="no-such-model")


def test_cache_from_other_preprocessing_is_refused_and_overwrite_replaces_it(tmp_path):
    extract_tiny("digits", tmp_path / "cache", splits=["test"], limit=8, spec="cls")
    with pytest.raises(SidetuneError, match="built differently: preprocessing.*--overwrite"):
        extract_tiny("digits", tmp_path / "cache", splits=["test"], limit=8, spec="cls", preprocess="inception")
    extract_tiny("digits", tmp_path / "cache", splits=["test"], limit=8, spec="cls", preprocess="inception", overwrite=True)
    assert sidetune.open_cache(tmp_path / "cache").manifest["preprocessing"]["name"] == "inception"


@pytest.mark.parametrize("change, field", [
    ({"spec": "mean"}, "spec"),
    ({"limit": 9}, "dataset.fingerprint"),
    ({"weights": "OTHER"}, "backbone.weights_sha256"),
])
def test_cache_from_other_spec_dataset_or_weights_is_refused(tmp_path, tiny_weights, change, field):
    extract_tiny("digits", tmp_path / "cache", splits=["test"], limit=8, spec="cls")
    options = {"splits": ["test"], "limit": 8, "spec": "cls", **change}
    if options.get("weights") == "OTHER":
        options["weights"] = tiny_weights
    with pytest.raises(SidetuneError, match=f"built differently: {field}"):
        extract_tiny("digits", tmp_path / "cache", **options)


def test_overwrite_never_deletes_a_folder_that_is_not_a_cache(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(SidetuneError, match="refuses to replace .*thesis.*not a sidetune cache"):
        extract_tiny("digits", precious, splits=["test"], limit=2, spec="cls", overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "years of work"


def test_fp16_overflow_is_reported_not_stored_as_inf(tmp_path):
    from safetensors.torch import save_file

    model = tiny_vit()
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(1e6)
    weights = tmp_path / "huge.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    with pytest.raises(SidetuneError, match="overflow float16.*stage 0.*dtype: bfloat16 or float32"):
        extract_tiny("digits", tmp_path / "cache", splits=["test"], limit=4, weights=weights)
    assert not sidetune.open_cache(tmp_path / "cache").split("test").complete
    wide = tmp_path / "fp32.yaml"
    wide.write_text("dtype: float32\n")
    extract_tiny("digits", tmp_path / "wide", splits=["test"], limit=4, weights=weights, spec=str(wide))
    stored = sidetune.open_cache(tmp_path / "wide").split("test")
    assert np.isfinite(stored.load()).all() and max(stored.record["absmax"]) > 65504


def test_pretrained_weights_without_hub_explain_how_to_pass_weights(tmp_path):
    with pytest.raises(SidetuneError, match="Could not fetch pretrained weights for vit_base_patch16_224.orig_in21k.*--weights FILE"):
        sidetune.extract("vit_b16", "digits", tmp_path / "cache", splits=["test"], limit=2, workers=0)


def test_vtab_task_without_local_folder_or_hub_names_the_data_root_fix(tmp_path):
    with pytest.raises(SidetuneError, match="Could not load the Hugging Face dataset tanganke/dtd.*--data-root"):
        extract_tiny("dtd", tmp_path / "cache")


def test_weights_for_another_architecture_are_refused(tmp_path, tiny_weights):
    with pytest.raises(SidetuneError, match="does not fit VisionTransformer: .*wrong shape [1-9]"):
        extract_tiny("digits", tmp_path / "cache", model="vit_ti16", weights=tiny_weights, limit=2)


def test_cli_prints_one_paragraph_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidetune", "extract", "--model", "nope", "--dataset", "digits",
         "--out", str(tmp_path / "c"), "--no-pretrained"],
        capture_output=True, text=True, env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200",
                                             "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "Unknown model 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("grid, message", [
    ({"lr": ["abc"]}, "--lr got 'abc', which is not a number"),
    ({"lr": [0.0]}, "--lr got 0.0; it must be above 0"),
    ({"weight_decay": [-1e-4]}, "--wd got -0.0001; it must be at least 0"),
    ({"rank": [0]}, "--rank got 0; it must be at least 1"),
    ({"rank": [8.5]}, "--rank got 8.5, which is not an integer"),
    ({"epochs": ["ten"]}, "--epochs got 'ten', which is not an integer"),
    ({"label_smoothing": [1.0]}, "label smoothing must be below 1"),
    ({"seed": []}, "--seed has no values"),
    ({"lr": [1e-3, 1e-3]}, "lists the same configuration twice"),
])
def test_a_bad_grid_value_is_named_with_its_fix(grid, message):
    with pytest.raises(sidetune.SidetuneError, match=message):
        sidetune.expand_grid("last", grid)


def test_sweep_with_a_non_number_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidetune", "sweep", "--cache", str(tmp_path / "c"), "--lr", "abc"],
        capture_output=True, text=True, env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert result.returncode == 2, result.stderr
    assert "--lr got 'abc', which is not a number" in result.stderr and "Traceback" not in result.stderr


def test_fused_kernels_on_the_cpu_are_refused_with_the_fix(tmp_path):
    cache = tmp_path / "cache"
    extract_tiny("digits", cache, splits=["train800"], limit=8)
    result = subprocess.run(
        [sys.executable, "-m", "sidetune", "train", "--cache", str(cache), "--method", "last", "--rank", "4",
         "--epochs", "1", "--train-split", "train800", "--eval-split", "train800", "--device", "cpu", "--fused",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200",
                                             "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "--fused runs Triton kernels on a CUDA GPU" in result.stderr and "without --fused" in result.stderr
    assert "Traceback" not in result.stderr


def test_overwrite_keeps_the_old_cache_whole_until_the_new_one_is_complete(class_folder, tmp_path):
    out = tmp_path / "cache"
    extract_tiny(class_folder, out, spec="cls")
    before = sidetune.open_cache(out).manifest
    (class_folder / "square" / "3.png").write_bytes(b"this is not a png")
    with pytest.raises(SidetuneError, match=r"Could not read image .*square/3\.png"):
        extract_tiny(class_folder, out, spec="mean", overwrite=True)
    kept = sidetune.open_cache(out)
    assert kept.manifest == before and kept.split("trainval").load().shape[0] == 12  # the old cache, whole
    assert (tmp_path / "cache.sidetune-new").is_dir()  # the new one's finished shards, kept for the rerun
    write_image(class_folder / "square" / "3.png", seed=13)
    extract_tiny(class_folder, out, spec="mean", overwrite=True)
    assert sidetune.open_cache(out).manifest["spec"]["name"] == "mean"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "shapes"]  # nothing beside it left
    assert not (out / "extract.lock").exists()


def test_a_swap_cut_short_between_its_renames_is_undone_on_the_next_run(tmp_path):
    from sidetune.replacing import recover

    (tmp_path / "cache.sidetune-old").mkdir()
    (tmp_path / "cache.sidetune-old" / "zarr.json").write_text("{}")
    recover(tmp_path / "cache")
    assert (tmp_path / "cache" / "zarr.json").is_file() and not (tmp_path / "cache.sidetune-old").exists()
