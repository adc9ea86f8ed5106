"""Summed caches (sums of stages over contiguous groups, and the last stage) and MIST, the side
network that reads them."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sidetune
from conftest import assert_live_run_predicts_its_cached_logits, config, extract_tiny, float32_spec, sidetune_cli
from sidetune.cache.layout import StageShape
from sidetune.cache.spec import CacheSpec, specs_serving
from sidetune.training import sidenet_blueprint, train_group
from sidetune.training.data import load_features


@pytest.fixture(scope="module")
def exact_caches(tmp_path_factory):
    """16 val200 digits through test_vit, every stage and summed in three groups, float32."""
    root = tmp_path_factory.mktemp("summed")
    extract_tiny("digits", root / "every", splits=["val200"], limit=16, spec=float32_spec(root, "every"))
    extract_tiny("digits", root / "summed3", splits=["val200"], limit=16,
                 spec=float32_spec(root, "summed3", sum_groups=3))
    return sidetune.open_cache(root / "every"), sidetune.open_cache(root / "summed3")


def test_a_summed_cache_stores_each_groups_sum_and_the_last_stage(exact_caches):
    every, summed = exact_caches
    stages = every.split("val200").load()  # (16, 7, T, D)
    stored = summed.split("val200").load()  # (16, 4, T, D)
    assert stored.shape == (16, 4, *stages.shape[2:])
    for position, group in enumerate([(0, 1, 2), (3, 4), (5, 6)]):
        expected = stages[:, group[0]].copy()
        for stage in group[1:]:
            expected += stages[:, stage]
        np.testing.assert_array_equal(stored[:, position], expected)
    np.testing.assert_array_equal(stored[:, 3], stages[:, 6])
    layout = summed.manifest["layout"]
    assert layout["stages"] == [-3, -2, -1, 6]
    assert [shape.get("summed") for shape in layout["stage_shapes"]] == [[0, 1, 2], [3, 4], [5, 6], None]


def test_the_shipped_summed_spec_stores_two_tensors_per_image(tmp_path):
    extract_tiny("digits", tmp_path / "c", splits=["val200"], limit=4, spec="summed")
    cache = sidetune.open_cache(tmp_path / "c")
    assert cache.split("val200").load().shape[1] == 2
    assert cache.manifest["spec"]["sum_groups"] == 1 and cache.manifest["spec"]["keep_last"] is True


def test_sums_of_stages_of_different_shapes_are_refused_naming_a_spec_that_stores_them():
    shapes = [StageShape(1, 64, 24, (8, 8), 0), StageShape(2, 16, 48, (4, 4), 0)]
    with pytest.raises(sidetune.SidetuneError, match=r"sums stages 1..2, but their tokens differ in shape.*e\.g\. default"):
        CacheSpec("mine", sum_groups=1).stored_layout(shapes)


def test_more_groups_than_stages_are_refused():
    shapes = [StageShape(stage, 5, 8, (2, 2), 1) for stage in range(3)]
    with pytest.raises(sidetune.SidetuneError, match="Set sum_groups to at most 3"):
        CacheSpec("mine", sum_groups=4).stored_layout(shapes)


def test_mist_computes_the_written_formula_for_each_of_two_stacked_configs(exact_caches, device):
    """S_g: the sum of group g's stages; u = 0; for each group u = u + S_g, then `depth` modules
    u = u + W_o MHA_r(LN(u)); y = z_N + (u - sum_g S_g); logits = head(LN_f(y)[CLS])."""
    every, _ = exact_caches
    options = {"groups": 2, "depth": 2, "rank": 8, "heads": 2, "zero_init_out": False}
    net = sidenet_blueprint(every, "mist", options).build(2)
    net.reset_parameters([0, 1])
    net.to(device)
    tokens = load_features(every, "val200", net.stages_needed(), device).tokens[:8]
    x = tokens.double()
    norm = every.final_norm()
    final_weight, final_bias = (torch.from_numpy(norm[n]).double().to(device) for n in ("weight", "bias"))
    with torch.no_grad():
        logits = net(tokens)
        for k in range(2):
            p = {name: parameter[k].double() for name, parameter in net.named_parameters()}

            def module(u, m):  # module m's parameters: its slice of each stacked parameter
                z = F.layer_norm(u, (64,), p["lsa_norm_weight"][m], p["lsa_norm_bias"][m], 1e-6)
                q, key, v = (z @ w for w in p["lsa_w_qkv"][m].split(8, -1))
                heads = [torch.softmax(q[..., c:c + 4] @ key[..., c:c + 4].transpose(-1, -2) / 2.0, -1) @ v[..., c:c + 4]
                         for c in (0, 4)]
                return u + torch.cat(heads, -1) @ p["lsa_w_o"][m]

            sums = [x[:, 0:4].sum(1), x[:, 4:7].sum(1)]  # 7 stages in 2 groups: 0..3, 4..6
            u = torch.zeros_like(sums[0])
            for g, s in enumerate(sums):
                u = u + s
                for j in range(2):
                    u = module(u, 2 * g + j)
            y = F.layer_norm(x[:, 6] + u - sums[0] - sums[1], (64,), final_weight, final_bias, norm["eps"])
            expected = y[:, 0] @ p["head_weight"] + p["head_bias"]
            torch.testing.assert_close(logits[k].double(), expected, atol=1e-4, rtol=1e-4)


def test_mist_on_a_summed_cache_equals_mist_summing_every_stage_itself(exact_caches, device):
    every, summed = exact_caches
    nets = [sidenet_blueprint(cache, "mist", {"zero_init_out": False, "groups": 3}).build(2) for cache in (every, summed)]
    logits = []
    for net, cache in zip(nets, (every, summed)):
        net.reset_parameters([4, 5])
        net.to(device)
        with torch.no_grad():
            logits.append(net(load_features(cache, "val200", net.stages_needed(), device).tokens))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_zero_initialised_mist_starts_as_the_linear_probe_on_the_last_stage(exact_caches, device):
    _, summed = exact_caches
    mist = sidenet_blueprint(summed, "mist", {}).build(1)
    linear = sidenet_blueprint(summed, "linear", {"standardize": False}).build(1)
    mist.reset_parameters([3]), linear.reset_parameters([3])
    tokens = load_features(summed, "val200", mist.stages_needed(), device).tokens
    mist.to(device), linear.to(device)
    with torch.no_grad():
        torch.testing.assert_close(mist(tokens), linear(tokens[:, [3]]), atol=1e-5, rtol=1e-5)


def test_mist_parameter_count_follows_the_formula(exact_caches):
    every, summed = exact_caches
    d, r, classes = 64, 8, 10
    for cache, groups, depth in ((summed, 3, 2), (every, 1, 4), (every, 2, 1)):
        net = sidenet_blueprint(cache, "mist", {"rank": r, "depth": depth, "groups": groups}).build(1)
        assert net.trainable_parameters_per_config() == groups * depth * (4 * d * r + 2 * d) + d * classes + classes


def test_mist_with_other_groups_than_a_summed_cache_holds_is_refused(exact_caches):
    _, summed = exact_caches
    with pytest.raises(sidetune.SidetuneError, match=r"stores 3 sums .*Use --groups 3"):
        sidenet_blueprint(summed, "mist", {"groups": 2}).build(1)


def test_methods_reading_every_stage_refuse_a_summed_cache_and_the_probes_read_its_last_stage(exact_caches):
    _, summed = exact_caches
    with pytest.raises(sidetune.SidetuneError, match=r"stores the sum of stages 0..2, .* stage 6 .*reads this cache: "
                                                      r"linear, ridge, knn, attentive, head2toe, mist\."):
        sidenet_blueprint(summed, "last", {}).build(1)


def test_the_smallest_spec_serving_mist_is_the_summed_one_and_no_other_method_is_offered_sums():
    assert specs_serving(12, list(range(13)), ("all",), sums=True)[0] == "summed"
    assert not {"summed", "summed3"} & set(specs_serving(12, list(range(13)), ("all",)))
    assert "summed" not in specs_serving(4, [1, 2, 3, 4], ("all",), first=1, one_shape=False, sums=True)


def test_mist_learns_digits_from_a_summed_cache_well_above_chance(tmp_path, device):
    extract_tiny("digits", tmp_path / "c", splits=["train800", "val200"], spec="summed")
    [result] = train_group(sidetune.open_cache(tmp_path / "c"), [config("mist", epochs=4, lr=3e-3)],
                           "train800", "val200", device)
    assert result.status == "ok" and result.top1 > 45.0  # chance is 10%
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_extract_summed_then_train_and_sweep_mist_through_the_cli(tmp_path):
    cli = lambda *args: sidetune_cli(*args, cwd=tmp_path)
    cache = str(tmp_path / "cache")
    done = cli("extract", "--model", "test_vit", "--dataset", "digits", "--no-pretrained", "--spec", "summed3",
               "--splits", "train800,val200", "--limit", "64", "--out", cache)
    assert done.returncode == 0, done.stderr
    info = cli("info", cache)
    assert "the sum of stages 0..2, the sum of stages 3..4, the sum of stages 5..6, stage 6" in info.stderr
    done = cli("train", "--cache", cache, "--method", "mist", "--epochs", "2", "--depth", "1", "--rank", "4",
               "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "mist" and metrics["eval_split"] == "val200" and 0 <= metrics["top1"] <= 100
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    done = cli("sweep", "--cache", cache, "--method", "mist", "--lr", "1e-3,3e-3", "--depth", "1", "--epochs", "1",
               "--protocol", "none", "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "sweep"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    done = cli("train", "--cache", cache, "--method", "mist", "--groups", "2", "--epochs", "1",
               "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "refused"))
    assert done.returncode != 0 and "Use --groups 3" in done.stderr and "Traceback" not in done.stderr


def test_a_mist_run_on_a_summed_cache_scores_its_live_test_split_and_predicts_the_logits_its_cache_gives(
        tmp_path, vtab_folder):
    """The sums of a live split and of `predict`'s images are computed as extraction computes them."""
    assert_live_run_predicts_its_cached_logits("test_vit", "summed3", vtab_folder, tmp_path,
                                               config("mist", epochs=2, rank=4, depth=1))
