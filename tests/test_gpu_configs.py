"""Every autotune candidate the GPU may pick, launched once (untimed) at one small shape and checked (CUDA only).

The table of `sdvae_fast.autotune_table` or a first-use tuning run may choose any config that survives pruning, so
each one is pinned in turn (`autotune_table.pinned_config`, or attention's `config=`) and compared with a float64
reference: the configs users get are configs that were checked. bench/gpu_plan.py records these same calls
(`conv_inputs`, `attention_inputs`) on meta tensors, so `warmup --plan` compiles them ahead of the run.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, error_report

pytestmark = pytest.mark.gpu

GROUPS = 32
# (N, C_in, H, W) of the small conv inputs; C_out is 32 for the narrow tiles (BLOCK_N <= 32), 256 otherwise.
CONV_INPUT = (1, 64, 24, 20)
ATTENTION_TOKENS = 160  # not a multiple of any BLOCK_M or BLOCK_N: the masked tail runs too
ATTENTION_HEAD_DIMS = (64, 384, 512)


def conv_out_channels(config) -> int:
    """The output width at which `config` is an autotune candidate (see `conv.configs_for_width`)."""
    return 32 if config.kwargs["BLOCK_N"] <= 32 else 256


def conv_inputs(config, mode: str, device, dtype=torch.bfloat16) -> dict:
    """Seeded inputs of one conv launch: mode "gsc" (3x3, GroupNorm scale/shift + SiLU, bias, residual) or
    "upsample" (nearest 2x + 3x3), both emitting GroupNorm statistics. Tensors on `device` (meta: empty)."""
    n, c_in, h, w = CONV_INPUT
    c_out = conv_out_channels(config)
    gen = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0, shift=0.0, channels_last=False, dt=dtype):
        if torch.device(device).type == "meta":
            t = torch.empty(shape, device="meta", dtype=dt)
        else:
            t = (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dt)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    out_side = (2 * h, 2 * w) if mode == "upsample" else (h, w)
    inputs = dict(x=make(n, c_in, h, w, shift=0.3, channels_last=True),
                  weight=make(c_out, c_in, 3, 3, scale=(9 * c_in) ** -0.5), bias=make(c_out, scale=0.2))
    if mode == "gsc":
        inputs.update(scale=make(n, c_in, scale=0.2, shift=1.0, dt=torch.float32),
                      shift=make(n, c_in, scale=0.1, dt=torch.float32),
                      residual=make(n, c_out, *out_side, channels_last=True))
    return inputs


def run_conv(mode: str, inputs: dict):
    """The launcher call of `mode` on `inputs`: (out, mean, rstd)."""
    from sdvae_fast.kernels import conv

    if mode == "gsc":
        return conv.gn_silu_conv2d(inputs["x"], inputs["weight"], inputs["bias"], inputs["scale"], inputs["shift"],
                                   inputs["residual"], stats_groups=GROUPS)
    return conv.upsample_conv2d(inputs["x"], inputs["weight"], inputs["bias"], stats_groups=GROUPS)


def conv_reference(mode: str, inputs: dict, dtype=torch.float64) -> torch.Tensor:
    """`run_conv`'s output computed by PyTorch in `dtype` (float64: the reference; the inputs' dtype: PyTorch's
    own error, with the normalisation in fp32 as the kernel does)."""
    d = {k: v.to(dtype) for k, v in inputs.items()}
    if mode == "gsc":
        x, scale, shift = inputs["x"].float(), inputs["scale"].float(), inputs["shift"].float()
        if dtype == torch.float64:
            x, scale, shift = x.double(), scale.double(), shift.double()
        a = F.silu(x * scale[:, :, None, None] + shift[:, :, None, None]).to(dtype)
        return F.conv2d(a, d["weight"], d["bias"], padding=1) + d["residual"]
    up = F.interpolate(d["x"], scale_factor=2.0, mode="nearest")
    return F.conv2d(up, d["weight"], d["bias"], padding=1)


def attention_inputs(head_dim: int, device, dtype=torch.bfloat16) -> tuple:
    """Seeded q, k, v of shape (1, 1, ATTENTION_TOKENS, head_dim) on `device` (meta: empty)."""
    shape = (1, 1, ATTENTION_TOKENS, head_dim)
    if torch.device(device).type == "meta":
        return tuple(torch.empty(shape, device="meta", dtype=dtype) for _ in range(3))
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))


def attention_config_dicts(head_dim: int, device) -> list:
    """The attention configs of `head_dim` that fit `device`'s shared memory, as `attention_forward(config=)`
    dicts (bf16)."""
    from sdvae_fast.kernels import attention
    from sdvae_fast.kernels._common import max_shared_memory

    block_d = attention.head_dim_block(head_dim)
    limit = max_shared_memory(device)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in attention.attention_configs(block_d) if attention._smem_bytes(c, block_d, 2) <= limit]


def _conv_configs():
    from sdvae_fast.kernels import conv

    return list(conv.CONV_CONFIGS)


@pytest.mark.parametrize("mode", ["gsc", "upsample"])
def test_every_conv_config_matches_float64(mode):
    from sdvae_fast import autotune_table
    from sdvae_fast.kernels import conv
    from sdvae_fast.kernels._common import max_shared_memory

    limit = max_shared_memory("cuda")
    checked = 0
    for config in _conv_configs():
        if conv._smem_bytes(config, 2) > limit:
            print(f"{config}: pruned on this GPU (shared memory)")
            continue
        inputs = conv_inputs(config, mode, "cuda")
        with autotune_table.pinned_config(conv._conv_kernel, config):
            out, mean, rstd = run_conv(mode, inputs)
        expected = conv_reference(mode, inputs)
        torch_rel = error_report(conv_reference(mode, inputs, torch.bfloat16), expected)["rel_l2"]
        assert_close(out, expected, rel_l2=2 * torch_rel + 1e-3, name=f"{mode} {config}")
        stored = out.double().reshape(out.shape[0], GROUPS, -1)
        assert_close(mean, stored.mean(-1), rel_l2=1e-4, atol=1e-4, name=f"{mode} {config} mean")
        assert_close(rstd, stored.var(-1, unbiased=False).add(1e-6).rsqrt(), rel_l2=1e-4, name=f"{mode} rstd")
        checked += 1
    assert checked, "no conv config fits this GPU"


@pytest.mark.parametrize("head_dim", ATTENTION_HEAD_DIMS)
def test_every_attention_config_matches_float64(head_dim):
    from sdvae_fast.kernels.attention import attention_forward

    q, k, v = attention_inputs(head_dim, "cuda")
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch_rel = error_report(F.scaled_dot_product_attention(q, k, v), expected)["rel_l2"]
    configs = attention_config_dicts(head_dim, "cuda")
    assert configs, "no attention config fits this GPU"
    for config in configs:
        assert_close(attention_forward(q, k, v, config=config), expected, rel_l2=2 * torch_rel + 1e-3,
                     name=f"attention D={head_dim} {config}")
