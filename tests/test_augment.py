"""Feature-space augmentation (c²FroFA brightness): the written formula, no effect at magnitude
0, independence from stack partners, reproducibility, and the command line."""

import json

import pytest
import torch
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import config
from sidetune.training import train_group
from sidetune.training.augment import BrightnessAugmentation


def test_brightness_maps_patch_tokens_to_their_channel_range_scales_each_channel_and_maps_back():
    torch.manual_seed(0)
    tokens = torch.randn(4, 2, 5, 3)  # (B, S, T, D), one prefix token
    augmentation = BrightnessAugmentation.fit([(tokens, None)], [(5, 3), (5, 3)], prefix=1, magnitude=0.4)
    out = augmentation(tokens, torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    for s in range(2):
        patches = tokens[:, s, 1:]
        low, high = patches.amin(dim=(0, 1)), patches.amax(dim=(0, 1))
        v = torch.rand(4, 1, 3, generator=draws) * 2 - 1
        expected = (((patches - low) / (high - low) * (1 + 0.4 * v)).clamp(0, 1)) * (high - low) + low
        torch.testing.assert_close(out[:, s, 1:], expected)
    assert torch.equal(out[:, :, 0], tokens[:, :, 0])  # prefix tokens untouched
    assert not torch.equal(out, tokens)


def test_brightness_works_on_flat_batches_of_stages_of_different_shapes():
    torch.manual_seed(0)
    first, second = torch.randn(3, 4, 2), torch.randn(3, 2, 5)
    flat = torch.cat([first.flatten(1), second.flatten(1)], 1)
    augmentation = BrightnessAugmentation.fit([(flat, None)], [(4, 2), (2, 5)], prefix=0, magnitude=0.3)
    out = augmentation(flat, torch.Generator().manual_seed(1))
    assert out.shape == flat.shape
    for stage, (start, stop, shape) in enumerate(((0, 8, (4, 2)), (8, 18, (2, 5)))):
        before, after = flat[:, start:stop].view(3, *shape), out[:, start:stop].view(3, *shape)
        assert not torch.equal(before, after), stage
        low, high = before.amin(dim=(0, 1)), before.amax(dim=(0, 1))
        assert bool(((after >= low - 1e-6) & (after <= high + 1e-6)).all())  # clipped to the channel's range


def test_magnitude_zero_trains_bitwise_as_without_augmentation(digits_cache):
    plain = train_group(digits_cache, [config("linear", epochs=2)], "train800", "val200", "cpu")[0]
    zero = train_group(digits_cache, [config("linear", epochs=2, augment="frofa-brightness", augment_magnitude=0.0)],
                       "train800", "val200", "cpu")[0]
    for name, tensor in plain.state.items():
        assert torch.equal(tensor, zero.state[name]), name


def test_augmentation_changes_training_and_a_run_reproduces(digits_cache):
    augmented = config("last", epochs=2, rank=4, augment="frofa-brightness", augment_magnitude=0.5)
    plain = train_group(digits_cache, [config("last", epochs=2, rank=4)], "train800", "val200", "cpu")[0]
    first, again = (train_group(digits_cache, [augmented], "train800", "val200", "cpu")[0] for _ in range(2))
    assert not torch.equal(first.state["head_weight"], plain.state["head_weight"])
    for name, tensor in first.state.items():
        assert torch.equal(tensor, again.state[name]), name


def test_an_augmented_configs_batches_do_not_depend_on_its_stack_partners(digits_cache):
    options = {"epochs": 2, "rank": 4, "augment": "frofa-brightness", "augment_magnitude": 0.5}
    mine = config("last", lr=3e-3, **options)
    alone = train_group(digits_cache, [mine], "train800", "val200", "cpu")[0]
    stacked = train_group(digits_cache, [config("last", lr=1e-3, seed=5, **options), mine], "train800", "val200", "cpu")[1]
    assert stacked.top1 == alone.top1
    torch.testing.assert_close(stacked.state["head_weight"], alone.state["head_weight"], rtol=1e-5, atol=1e-6)


def test_train_augments_from_the_command_line_and_records_it(digits_cache, tmp_path):
    result = CliRunner().invoke(app, ["train", "--cache", str(digits_cache.path), "--method", "linear", "--epochs", "2",
                                      "--augment", "frofa-brightness", "--augment-magnitude", "0.3",
                                      "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["hyperparameters"]
    assert recorded["augment"] == "frofa-brightness" and recorded["augment_magnitude"] == 0.3


@pytest.mark.parametrize("fields, message", [({"augment": "mixup"}, "Unknown augmentation 'mixup'. Choose one of"),
                                             ({"augment": "frofa-brightness", "augment_magnitude": 2.0},
                                              "--augment-magnitude got 2.0; it must be between 0 and 1")])
def test_a_bad_augmentation_is_named_with_its_fix(fields, message):
    with pytest.raises(sidetune.SidetuneError, match=message):
        config("linear", **fields)


def test_a_bad_augmentation_on_the_command_line_prints_one_line(digits_cache, tmp_path):
    import subprocess
    import sys

    from conftest import python_path

    result = subprocess.run([sys.executable, "-m", "sidetune", "train", "--cache", str(digits_cache.path), "--augment",
                             "mixup", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert result.returncode != 0 and "Unknown augmentation 'mixup'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_sweep_over_augmentation_magnitudes_trains_one_stack_per_magnitude(digits_cache, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--cache", str(digits_cache.path), "--method", "linear", "--epochs", "1",
                                      "--augment", "frofa-brightness", "--augment-magnitude", "0,0.5", "--protocol", "none",
                                      "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["augment_magnitude"] for row in rows) == [0.0, 0.5]
