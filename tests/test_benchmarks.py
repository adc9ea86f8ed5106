"""The analytic FLOP counts behind benchmarks/stage_two.py's efficiency figure agree with
torch's own FLOP counter run over the real computation."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sidetune.backbones import forward_stages, load_backbone
from sidetune.sidenets import FeatureLayout, create_sidenet
from sidetune.training.step import cross_entropy_per_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stage_two  # noqa: E402


@pytest.mark.parametrize("method", ["linear", "last", "losa"])
def test_side_training_flops_match_the_counted_forward_and_backward(method):
    width, depth, tokens, classes, batch = 64, 4, 17, 5, 3
    layout = FeatureLayout(depth=depth, width=width, num_tokens=tokens, num_prefix_tokens=1, num_classes=classes,
                           stages=tuple(range(depth + 1)), token_selection="all")
    net = create_sidenet(method, layout, 1, **stage_two.METHODS[method])
    net.set_final_norm(torch.ones(width), torch.zeros(width), 1e-6)
    net.reset_parameters([0])
    inputs = torch.randn(batch, len(net.stages_needed()), tokens, width).half()
    labels = torch.randint(0, classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        cross_entropy_per_config(net(inputs).float(), labels, torch.zeros(1)).sum().backward()
    analytic = stage_two.side_training_flops(method, stage_two.METHODS[method], width, depth, tokens, classes, batch)
    assert analytic == pytest.approx(counter.get_total_flops() / batch, rel=0.05)


def test_backbone_forward_flops_match_the_counted_forward():
    backbone = load_backbone("test_vit", pretrained=False)
    for block in backbone.model.blocks:
        block.attn.fused_attn = False  # explicit products, which the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for _ in forward_stages(backbone.model, torch.randn(1, 3, *backbone.model.patch_embed.img_size),
                                [backbone.depth]):
            pass
    assert stage_two.backbone_forward_flops(backbone.model, backbone.num_tokens) == counter.get_total_flops()
