"""The training engine: stacks, the step, non-finite configurations, compile and CUDA graphs, the loss.

What each side network computes is in tests/test_sidenets.py."""

import pytest
import torch

import sidetune
from conftest import config, device_under_test, train_on_digits
from sidetune.training import sidenet_blueprint, train_group
from sidetune.training.data import load_features


def test_a_config_trained_in_a_stack_matches_it_trained_alone(digits_cache):
    stacked = train_on_digits(digits_cache, [{"method": "last", "rank": 8, "lr": lr, "seed": s}
                                   for lr, s in ((1e-3, 0), (3e-3, 1), (1e-2, 2))], epochs=2)
    [alone] = train_on_digits(digits_cache, [{"method": "last", "rank": 8, "lr": 3e-3, "seed": 1}], epochs=2)
    if device_under_test().type == "cpu":
        for name, value in alone.state.items():
            torch.testing.assert_close(stacked[1].state[name], value, atol=1e-5, rtol=1e-4)
        assert stacked[1].top1 == alone.top1
    else:  # bf16 autocast: the stacked products round differently, within bf16's precision
        for name, value in alone.state.items():
            assert (stacked[1].state[name] - value).norm() <= 1e-2 * value.norm() + 1e-6, name
        assert abs(stacked[1].top1 - alone.top1) <= 2.0


def test_a_diverging_config_is_frozen_and_the_others_finish_unchanged(digits_cache):
    healthy = {"method": "linear", "lr": 1e-2, "seed": 0}
    with_bad = train_on_digits(digits_cache, [healthy, {"method": "linear", "lr": 1e38, "seed": 1}], epochs=2)
    [alone] = train_on_digits(digits_cache, [healthy], epochs=2)
    assert with_bad[1].status == "failed" and "loss became" in with_bad[1].failure
    assert with_bad[0].status == "ok" and with_bad[0].top1 == alone.top1
    torch.testing.assert_close(with_bad[0].state["head_weight"], alone.state["head_weight"])


def test_method_needing_stages_the_cache_lacks_names_the_smallest_specs_that_have_them(tmp_path):
    sidetune.extract("test_vit", "digits", tmp_path / "c", splits=["val200"], limit=8, spec="final",
                     pretrained=False, workers=0)
    cache = sidetune.open_cache(tmp_path / "c")
    with pytest.raises(sidetune.SidetuneError, match=r"Method last reads stages .*--spec int8 \(or default"):
        sidenet_blueprint(cache, "last", {}).build(1)
    with pytest.raises(sidetune.SidetuneError, match=r"Method last reads stages \[0, 2, 4, 6\].*--spec gap2-int8 \(or int8, gap2\)"):
        sidenet_blueprint(cache, "last", {"gap": 2}).build(1)


def test_a_compiled_side_network_trains_to_the_eager_result(digits_cache, device):
    eager, = train_on_digits(digits_cache, [dict(method="last", rank=4, lr=3e-3)], epochs=2)
    compiled, = train_group(digits_cache, [config("last", epochs=2, rank=4, lr=3e-3)], "train800", "val200", device,
                             compile=True)
    assert compiled.epoch_losses == pytest.approx(eager.epoch_losses, rel=1e-4)
    assert abs(compiled.top1 - eager.top1) <= 1.0


requires_cuda = pytest.mark.skipif(device_under_test().type != "cuda", reason="runs with --device cuda (benchmarks/gpu.sh)")


def test_cuda_graphs_are_refused_off_a_cuda_device(digits_cache):
    if device_under_test().type == "cuda":
        pytest.skip("checks the CPU's refusal")
    with pytest.raises(sidetune.SidetuneError, match="CUDA graphs need a CUDA device"):
        train_group(digits_cache, [config("linear", epochs=1)], "train800", "val200", "cpu", cuda_graphs=True)


@requires_cuda
def test_a_captured_step_trains_to_the_eager_result_and_sees_the_partial_last_batch(digits_cache, device):
    configs = [config("last", epochs=3, rank=4, lr=lr, batch_size=48) for lr in (1e-3, 3e-3)]  # 800 = 16 x 48 + 32
    eager = train_group(digits_cache, configs, "train800", "val200", device, cuda_graphs=False)
    captured = train_group(digits_cache, configs, "train800", "val200", device, cuda_graphs=True)
    for a, b in zip(eager, captured):
        assert b.epoch_losses == pytest.approx(a.epoch_losses, rel=2e-2)
        assert [row["train_top1"] for row in b.history] == pytest.approx([row["train_top1"] for row in a.history], abs=2.0)
        assert abs(a.top1 - b.top1) <= 2.0


@requires_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_training_steps_never_wait_for_the_device(digits_cache, device, cuda_graphs):
    from sidetune.training.optim import StackedAdamW
    from sidetune.training.step import StackedStep

    net = sidenet_blueprint(digits_cache, "last", {"rank": 4}).build(2)
    net.reset_parameters([0, 1])
    net.to(device)
    data = load_features(digits_cache, "train800", net.stages_needed(), device)
    step = StackedStep(net, StackedAdamW(net, torch.tensor([1e-3, 1e-2]), torch.tensor([0.0, 0.0])), torch.zeros(2), 64,
                       data.sample_shape, data.dtype, cuda_graphs=cuda_graphs)
    batches = list(data.batches(64, torch.Generator().manual_seed(0)))
    step(*batches[0], 1, 1.0)  # a first step may capture (which synchronises)
    step(*batches[-1], 2, 1.0)  # and the partial batch its own graph
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for number, (tokens, labels) in enumerate(batches[1:-1], start=3):
            step(tokens, labels, number, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(step.active.all()) and float(step.loss_sum.sum()) > 0


def test_the_per_config_loss_is_torchs_cross_entropy_with_each_configs_label_smoothing():
    from sidetune.training.step import cross_entropy_per_config

    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 8, 5, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    smoothing = torch.tensor([0.0, 0.1, 0.5])
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[k], labels, label_smoothing=float(s))
                            for k, s in enumerate(smoothing)])
    torch.testing.assert_close(cross_entropy_per_config(logits, labels, smoothing), expected)
