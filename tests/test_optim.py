"""The stacked AdamW: every configuration updated as torch.optim.AdamW would update it alone."""

import torch

from conftest import device_under_test
from sidetune.sidenets import FeatureLayout, create_sidenet
from sidetune.training.optim import StackedAdamW

LAYOUT = FeatureLayout(depth=2, width=16, num_tokens=5, num_prefix_tokens=1, num_classes=3, stages=(0, 1, 2),
                       token_selection="all")


def stacked_last(k: int) -> torch.nn.Module:
    net = create_sidenet("last", LAYOUT, k, rank=4, zero_init_out=False)
    net.set_final_norm(None, None, 0.0)
    net.reset_parameters(list(range(k)))
    return net.to(device_under_test())


def test_each_config_follows_torch_adamw_with_its_own_lr_and_weight_decay_and_no_decay_on_norms_and_biases():
    lrs, decays = [1e-3, 3e-2, 1e-1], [0.0, 1e-2, 0.5]
    net = stacked_last(3)
    references = []
    for j, (lr, decay) in enumerate(zip(lrs, decays)):
        groups = [{"params": [], "weight_decay": decay}, {"params": [], "weight_decay": 0.0}]
        copies = {}
        for name, parameter in net.named_parameters():
            copies[name] = parameter[j].detach().clone().requires_grad_()
            groups[0 if net.decay_mask(name) else 1]["params"].append(copies[name])
        references.append((copies, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)))
    device = device_under_test()
    optimizer = StackedAdamW(net, torch.tensor(lrs), torch.tensor(decays))
    active = torch.ones(3, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        lr_scale = 0.5 + 0.1 * step  # a schedule scales every config's lr
        for name, parameter in net.named_parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator).to(device)
            for j, (copies, _) in enumerate(references):
                copies[name].grad = parameter.grad[j].clone()
        optimizer.step(torch.tensor(lr_scale, device=device), torch.tensor(float(step), device=device), active)
        for (copies, reference), lr in zip(references, lrs):
            for group in reference.param_groups:
                group["lr"] = lr * lr_scale
            reference.step()
    for j, (copies, _) in enumerate(references):
        for name, parameter in net.named_parameters():
            torch.testing.assert_close(parameter[j], copies[name], atol=1e-5, rtol=1e-4)


def test_an_inactive_config_is_untouched_even_with_non_finite_gradients():
    net = stacked_last(2)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    device = device_under_test()
    optimizer = StackedAdamW(net, torch.tensor([1e-2, 1e-2]), torch.tensor([1e-2, 1e-2]))
    for parameter in net.parameters():
        parameter.grad = torch.ones_like(parameter)
        parameter.grad[1] = float("nan")
    optimizer.step(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device),
                   torch.tensor([True, False], device=device))
    for name, parameter in net.named_parameters():
        assert torch.equal(parameter[1], before[name][1]), name
        assert not torch.equal(parameter[0], before[name][0]), name
        assert torch.isfinite(parameter).all()


def test_parameters_alias_one_buffer_so_a_step_touches_them_all_in_place():
    net = stacked_last(2)
    optimizer = StackedAdamW(net, torch.tensor([1e-2, 1e-2]), torch.tensor([0.0, 0.0]))
    flat = optimizer.params
    for parameter in net.parameters():
        assert parameter.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert flat.shape == (2, sum(p[0].numel() for p in net.parameters()))
