"""The fused Triton kernels (sidetune/kernels/) compute what their torch implementations
compute, and compile for the GPUs they are meant for.

On the CPU the kernels run in a child process under Triton's interpreter
(tests/kernel_checks.py); with `--device cuda` the same checks run on the GPU in this process.
The torch implementation of the chain is itself checked against the written LAST formula
(tests/test_sidenets.py, and its gradients here)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, device_under_test, extract_tiny, python_path
from sidetune.sidenets import FeatureLayout, create_sidenet

TOLERANCE = 1e-4  # float32 arithmetic in a different order (tf32 products on a GPU: 3e-3)


def tolerance() -> float:
    return TOLERANCE if device_under_test().type == "cpu" else 3e-3


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Every check's measured errors: 8 digits through test_vit, each stage's grid pooled to
    2x2 (5 tokens: small enough for the interpreter), for the training check."""
    folder = tmp_path_factory.mktemp("kernels")
    spec = folder / "grid2.yaml"
    spec.write_text("stages: all\ntokens: all\nmax_grid: 2\ndtype: float16\nchunk_images: 1\nshard_images: 16\n")
    extract_tiny("digits", folder / "cache", splits=["train800"], limit=8, spec=str(spec))
    if device_under_test().type == "cuda":
        from kernel_checks import all_checks

        return all_checks(device_under_test(), str(folder / "cache"))
    out = folder / "checks.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path()}
    subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_checks.py"), str(out), str(folder / "cache")],
                   check=True, env=env, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["last_cls", "last_mean_heads", "last_gap_depth", "mist"])
def test_the_fused_chain_gives_the_torch_logits_and_every_parameters_gradient(checks, case):
    """Stacked configurations, non-zero W_O; CLS, mean and both pools; 1 and 2 heads; gap and
    depth 2 (several modules per group); MIST over two groups of stages."""
    errors = checks[case]
    assert errors["logits"] < tolerance()
    assert max(errors["gradients"].values()) < tolerance(), errors["gradients"]


def test_the_fused_adamw_makes_the_torch_update_and_leaves_an_inactive_config_untouched(checks):
    errors = checks["adamw"]
    assert max(errors[name] for name in ("params", "exp_avg", "exp_avg_sq")) < 1e-5
    assert errors["inactive_unchanged"] and errors["finite"]


def test_training_with_the_fused_kernels_follows_the_torch_training(checks):
    errors = checks["training"]
    assert errors["losses"] < 10 * tolerance() and errors["states"] < 10 * tolerance()
    assert errors["top1"][0] == pytest.approx(errors["top1"][1], abs=100 / 8)  # at most one image of 8 differs


@pytest.mark.parametrize("options", [{"pool": "cls"}, {"pool": "mean", "heads": 2, "gap": 2, "depth": 2}])
def test_the_chains_own_backward_gives_autograds_gradients_of_the_written_formula_in_float64(options):
    """u_0 = x_0, u_i = F_i(u_{i-1} + x_i), F_i: `depth` modules h + W_o MHA_r(LN(h)); y = u_m -
    sum x_{i<m} through the final norm, pooled: differentiated by autograd in float64, against
    the network's low-rank form with the chain's hand-written backward."""
    width, r = 16, 4
    layout = FeatureLayout(depth=4, width=width, num_tokens=7, num_prefix_tokens=1, num_classes=3, stages=tuple(range(5)),
                           token_selection="all")
    net = create_sidenet("last", layout, 2, rank=r, zero_init_out=False, **options)
    net.set_final_norm(torch.rand(width) + 0.5, torch.randn(width), 1e-6)
    net.reset_parameters([0, 1])
    net.double()
    tokens = torch.randn(3, len(net.stages_needed()), 7, width, dtype=torch.float64)
    params = dict(net.named_parameters())
    e = r // net.heads

    def written(j):
        u, m = tokens[:, 0], 0
        for i in range(1, tokens.shape[1]):
            h = u + tokens[:, i]
            for _ in range(net.depth):
                z = torch.nn.functional.layer_norm(h, (width,), params["lsa_norm_weight"][j, m],
                                                   params["lsa_norm_bias"][j, m], 1e-6)
                q, k, v = (z @ w for w in params["lsa_w_qkv"][j, m].split(r, -1))
                heads = [torch.softmax(q[..., c:c + e] @ k[..., c:c + e].transpose(-1, -2) / e ** 0.5, -1) @ v[..., c:c + e]
                         for c in range(0, r, e)]
                h = h + torch.cat(heads, -1) @ params["lsa_w_o"][j, m]
                m += 1
            u = h
        y = torch.nn.functional.layer_norm(u - tokens[:, :-1].sum(1), (width,), net.final_norm_weight, net.final_norm_bias, 1e-6)
        pooled = y[:, 0] if net.pool == "cls" else y[:, 1:].mean(1)
        return pooled @ params["head_weight"][j] + params["head_bias"][j]

    weights = torch.randn(2, 3, 3, dtype=torch.float64)
    ours = torch.autograd.grad((net(tokens) * weights).sum(), list(params.values()))
    reference = torch.autograd.grad((torch.stack([written(j) for j in range(2)]) * weights).sum(), list(params.values()))
    for name, a, b in zip(params, ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()), msg=name)


SHARED_MEMORY = {80: 166_912, 90: 232_448}  # the most one block may use on an A100 and on an H100/H200


def signature(kernel, products: str) -> dict[str, str]:
    """Triton's argument types for `kernel`: the shared products (S, U, Z, βW) in `products`,
    every other tensor float32 (the optimizer's active flags bool), sizes int32."""
    types = {}
    for parameter in kernel.params:
        name = parameter.name
        if parameter.is_constexpr:
            types[name] = "constexpr"
        elif name == "active_ptr":
            types[name] = "*i1"
        elif name.endswith("_ptr"):
            types[name] = "*" + (products if name in ("s_ptr", "u_ptr", "z_ptr", "bias_ptr") else "fp32")
        else:
            types[name] = "fp32" if name in ("width", "eps", "scale", "beta1", "beta2") else "i32"
    return types


@pytest.mark.parametrize("capability", [80, 90])
def test_every_kernel_compiles_ahead_of_time_for_the_gpu_within_its_shared_memory(capability):
    triton = pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot be compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sidetune.kernels import adamw_triton, chain_triton

    variants = [(kernel, {"R": rank, "HEADS": heads, "BLOCK_T": chain_triton.BLOCK_T, "BLOCK_N": chain_triton.BLOCK_N},
                 products)
                for kernel in (chain_triton.chain_forward_kernel, chain_triton.chain_backward_kernel)
                for rank, heads, products in ((16, 1, "bf16"), (32, 4, "fp32"))]
    variants.append((adamw_triton.adamw_kernel, {"BLOCK": adamw_triton.BLOCK}, "fp32"))
    for kernel, constants, products in variants:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, products), constexprs=constants),
                                  target=GPUTarget("cuda", capability, 32))
        assert "ptx" in compiled.asm and compiled.asm.get("cubin"), kernel.fn.__name__
        assert compiled.metadata.shared <= SHARED_MEMORY[capability], (kernel.fn.__name__, constants)


def test_the_chains_flop_formula_counts_the_products_of_its_torch_implementation():
    """What FlopCounterMode charges for the chain's custom ops (chain_flops) is what it counts
    in the torch implementation's forward, backward and input gradients run directly."""
    from torch.utils.flop_counter import FlopCounterMode

    from sidetune.kernels import chain, chain_reference

    groups, images, tokens, depth, configs, r, heads, width = 2, 3, 5, 2, 2, 4, 2, 16
    modules = groups * depth
    s, u = torch.randn(groups, images, tokens, depth, configs, 3 * r), torch.randn(groups, images, tokens, configs, modules, r)
    x_mean = torch.randn(groups, images, tokens)
    small = [torch.randn(configs, modules, *shape) for shape in ((3 * r,), (3 * r,), (r,), (r, modules, r), (r, modules, 3 * r))]
    with FlopCounterMode(display=False) as forward:
        a, qkv, mean, var, lse = chain_reference.chain_forward(s, u, x_mean, x_mean ** 2 + 1, *small, heads, width, 1e-6)
    with FlopCounterMode(display=False) as backward:
        gradients = chain_reference.chain_backward(torch.randn_like(a), a, qkv, mean, var, lse, u, *small, depth, width, 1e-6)
        chain.input_gradients(a, mean, var, *gradients, depth, width, 1e-6)
    formula = chain_reference.chain_flops(groups, images, tokens, depth, configs, r, heads)
    assert formula[0] == forward.get_total_flops()
    assert formula[1] == backward.get_total_flops()
