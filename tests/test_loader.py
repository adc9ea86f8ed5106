"""Features onto the device: resident when they fit the memory budget, streamed by shard otherwise."""

import torch

from conftest import config, device_under_test
from sidetune.training import sidenet_blueprint, train_group
from sidetune.training.data import LoadedSplits, ResidentFeatures, StreamedFeatures, load_features
from sidetune.training.scoring import predicted_classes

CPU = device_under_test()  # the device under test (named for the default)
LAST_STAGE = [6]


def test_a_split_within_the_budget_is_resident_and_one_beyond_it_is_streamed(digits_cache):
    nbytes = 200 * 101 * 64 * 2  # val200, one stage, float16
    assert isinstance(load_features(digits_cache, "val200", LAST_STAGE, CPU, budget_bytes=nbytes), ResidentFeatures)
    assert isinstance(load_features(digits_cache, "val200", LAST_STAGE, CPU, budget_bytes=nbytes - 1), StreamedFeatures)


def test_streamed_batches_cover_every_image_once_per_epoch(digits_cache):
    streamed = load_features(digits_cache, "train800", LAST_STAGE, CPU, budget_bytes=2 * 64 * 101 * 64 * 2)
    assert streamed.shards_per_window == 1
    resident = load_features(digits_cache, "train800", LAST_STAGE, CPU)
    batches = list(streamed.batches(48, torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in batches] == [48] * 16 + [32]
    # Each image's tokens are unique: match them back to the resident copy by their first values.
    seen = torch.cat([tokens[:, 0, 0, :4] for tokens, _ in batches])
    reference = resident.tokens[:, 0, 0, :4]
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, reference.tolist()))
    first_order = torch.cat([labels for _, labels in batches])
    second_order = torch.cat([labels for _, labels in streamed.batches(48, torch.Generator().manual_seed(1))])
    assert not torch.equal(first_order, second_order)  # reshuffled between epochs


def test_streamed_evaluation_equals_resident_evaluation(digits_cache):
    net = sidenet_blueprint(digits_cache, "linear", {}).build(2)
    net.reset_parameters([0, 1])
    net.to(CPU)
    resident = predicted_classes(net, load_features(digits_cache, "test", LAST_STAGE, CPU), 64)
    streamed = predicted_classes(net, load_features(digits_cache, "test", LAST_STAGE, CPU, budget_bytes=10**6), 64)
    assert torch.equal(resident[0], streamed[0]) and torch.equal(resident[1], streamed[1])


def test_training_from_a_streamed_split_learns(digits_cache):
    [result] = train_group(digits_cache, [config("last", epochs=3, rank=4, lr=3e-3)], "train800", "val200", CPU,
                           memory_budget=4 * 2**20)  # all 7 stages of train800 take 70 MiB
    assert result.status == "ok"
    assert result.top1 > 30.0  # chance is 10%


def test_stacks_share_a_split_loaded_once_until_other_stages_are_asked_for(digits_cache):
    loaded = LoadedSplits(digits_cache, CPU)
    first = loaded.get("val200", [0, 6])
    assert loaded.get("val200", [0, 6]) is first
    assert loaded.get("train800", [0, 6]) is not first and set(loaded.held) == {"val200", "train800"}
    other = loaded.get("val200", [6])  # some of the stages held: read from the same load
    assert other is not first and set(loaded.held) == {"val200", "train800"} and other.tokens.shape[1] == 1
    torch.testing.assert_close(other.tokens, first.tokens[:, [1]])
    wider = loaded.get("val200", [3, 6])  # stages not held: loaded anew, what was held dropped
    assert set(loaded.held) == {"val200"} and wider.tokens.shape[1] == 2
