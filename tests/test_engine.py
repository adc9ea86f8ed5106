"""Stage two: side networks trained from a digits cache by the stacked engine."""

import numpy as np
import pytest
import torch

import sidetune
from conftest import config
from sidetune.cache.loader import load_features
from sidetune.engine import build_sidenet, train_group


def train(cache, configs, epochs=4):
    """Train dicts of TrainConfig fields, method options (rank, pool, ...) mixed in."""
    return train_group(cache, [config(epochs=epochs, **c) for c in configs], "train800", "val200")


def test_zero_initialised_last_gives_the_linear_probe_logits_at_step_0(digits_cache):
    tokens = load_features(digits_cache, "val200", list(range(7)), torch.device("cpu")).tokens
    last = build_sidenet(digits_cache, "last", {"rank": 8}, 1)
    linear = build_sidenet(digits_cache, "linear", {"standardize": False}, 1)
    last.reset_parameters([3]), linear.reset_parameters([3])
    with torch.no_grad():
        torch.testing.assert_close(last(tokens.float()), linear(tokens[:, [6]].float()), atol=1e-5, rtol=1e-5)


def test_last_computes_the_written_formula_for_every_stacked_config(digits_cache):
    """u_0 = x_0, u_i = F_i(u_{i-1} + x_i), y = u_m - sum x_{i<m}; F_i: `depth` modules
    h + W_o MHA_r(LN(h)), here with gap 2, depth 2, 2 heads and a non-zero W_o."""
    tokens = load_features(digits_cache, "val200", [0, 2, 4, 6], torch.device("cpu")).tokens[:8].float()
    net = build_sidenet(digits_cache, "last", {"rank": 8, "gap": 2, "depth": 2, "heads": 2, "zero_init_out": False}, 2)
    net.reset_parameters([0, 1])
    p = lambda name, j: getattr(net, name)[j]

    def module(h, prefix, j):
        x = torch.nn.functional.layer_norm(h, (64,), p(f"{prefix}_norm_weight", j), p(f"{prefix}_norm_bias", j), 1e-6)
        q, k, v = (x @ p(f"{prefix}_w_{n}", j) for n in "qkv")
        heads = [torch.softmax(q[..., c:c + 4] @ k[..., c:c + 4].transpose(-1, -2) / 2.0, -1) @ v[..., c:c + 4]
                 for c in (0, 4)]
        return h + torch.cat(heads, -1) @ p(f"{prefix}_w_o", j)

    with torch.no_grad():
        for j in range(2):
            u = tokens[:, 0]
            for i in range(1, 4):
                h = u + tokens[:, i]
                for depth in range(2):
                    h = module(h, f"lsa{i - 1}_{depth}", j)
                u = h
            expected = u - tokens[:, :3].sum(1)
            torch.testing.assert_close(net.represent(tokens)[j], expected, atol=1e-5, rtol=1e-4)


def test_losa_starts_at_the_frozen_features(digits_cache):
    tokens = load_features(digits_cache, "val200", list(range(7)), torch.device("cpu")).tokens
    losa = build_sidenet(digits_cache, "losa", {}, 2)
    losa.reset_parameters([0, 1])
    with torch.no_grad():
        represented = losa.represent(tokens[:, 1:].float())
    torch.testing.assert_close(represented, tokens[:, 6].float().expand(2, -1, -1, -1))


@pytest.mark.parametrize("method, lr, epochs", [("linear", 3e-1, 30), ("last", 3e-3, 4), ("losa", 3e-3, 4)])
def test_every_method_learns_digits_well_above_chance(digits_cache, method, lr, epochs):
    [result] = train(digits_cache, [{"method": method, "lr": lr}], epochs=epochs)
    assert result.status == "ok"
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.top1 > 50.0  # chance is 10%


def test_last_parameter_count_follows_the_formula(digits_cache):
    d, r, classes, modules = 64, 8, 10, 6
    net = build_sidenet(digits_cache, "last", {"rank": r, "depth": 1}, 1)
    assert net.trainable_parameters_per_config() == modules * (4 * d * r + 2 * d) + d * classes + classes
    gap2 = build_sidenet(digits_cache, "last", {"rank": r, "gap": 2, "depth": 2}, 1)
    assert gap2.trainable_parameters_per_config() == 3 * 2 * (4 * d * r + 2 * d) + d * classes + classes


def test_losa_and_linear_parameter_counts_follow_the_formulas(digits_cache):
    d, t, classes, layers, rt, rc = 64, 101, 10, 6, 4, 8
    losa = build_sidenet(digits_cache, "losa", {"token_rank": rt, "channel_rank": rc}, 1)
    per_layer = 4 * d + 2 * t * rt + rt + t + 2 * d * rc + rc + d
    assert losa.trainable_parameters_per_config() == layers * per_layer + d * classes + classes
    assert build_sidenet(digits_cache, "linear", {}, 1).trainable_parameters_per_config() == d * classes + classes


def test_a_config_trained_in_a_stack_matches_it_trained_alone(digits_cache):
    stacked = train(digits_cache, [{"method": "last", "rank": 8, "lr": lr, "seed": s}
                                   for lr, s in ((1e-3, 0), (3e-3, 1), (1e-2, 2))], epochs=2)
    [alone] = train(digits_cache, [{"method": "last", "rank": 8, "lr": 3e-3, "seed": 1}], epochs=2)
    for name, value in alone.state.items():
        torch.testing.assert_close(stacked[1].state[name], value, atol=1e-5, rtol=1e-4)
    assert stacked[1].top1 == alone.top1


def test_a_diverging_config_is_frozen_and_the_others_finish_unchanged(digits_cache):
    healthy = {"method": "linear", "lr": 1e-2, "seed": 0}
    with_bad = train(digits_cache, [healthy, {"method": "linear", "lr": 1e38, "seed": 1}], epochs=2)
    [alone] = train(digits_cache, [healthy], epochs=2)
    assert with_bad[1].status == "failed" and "loss became" in with_bad[1].failure
    assert with_bad[0].status == "ok" and with_bad[0].top1 == alone.top1
    torch.testing.assert_close(with_bad[0].state["head_weight"], alone.state["head_weight"])


def test_method_needing_stages_the_cache_lacks_names_a_spec(tmp_path):
    sidetune.extract("test_vit", "digits", tmp_path / "c", splits=["val200"], limit=8, spec="final",
                     pretrained=False, workers=0)
    with pytest.raises(sidetune.SidetuneError, match="Method last reads stages .*--spec default"):
        build_sidenet(sidetune.open_cache(tmp_path / "c"), "last", {}, 1)


def test_linear_probe_lands_within_2_points_of_sklearn_logistic_regression(digits_cache):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    norm = digits_cache.final_norm()

    def cls_features(split):  # read straight from zarr, final norm in numpy: independent of sidenets
        cached = digits_cache.split(split)
        x = cached.tokens[:, -1, 0].astype(np.float64)
        x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + norm["eps"])
        return x * norm["weight"] + norm["bias"], cached.labels

    train_x, train_y = cls_features("train800")
    test_x, test_y = cls_features("test")
    scaler = StandardScaler().fit(train_x)
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(train_x), train_y)
    sklearn_top1 = 100 * reference.score(scaler.transform(test_x), test_y)
    [ours] = train_group(digits_cache, [config("linear", epochs=50, warmup_epochs=5)], "train800", "test")
    assert abs(ours.top1 - sklearn_top1) <= 2.0, (ours.top1, sklearn_top1)


def test_a_compiled_side_network_trains_to_the_eager_result(digits_cache):
    eager, = train(digits_cache, [dict(method="last", rank=4, lr=3e-3)], epochs=2)
    compiled, = train_group(digits_cache, [config("last", epochs=2, rank=4, lr=3e-3)], "train800", "val200", compile=True)
    assert compiled.epoch_losses == pytest.approx(eager.epoch_losses, rel=1e-4)
    assert abs(compiled.top1 - eager.top1) <= 1.0
