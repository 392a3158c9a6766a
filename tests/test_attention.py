"""Flash attention kernel (kernels/attention.py), the `attention` op, and the fused VAE mid-block attention.

Runs on CPU under the Triton interpreter (conftest sets TRITON_INTERPRET=1). References are float64 results from
the same inputs. Low-precision tolerance: at most 2x PyTorch's own error at that precision (its SDPA, or the
diffusers module, run in that dtype, against the same float64 reference) plus 1e-5. Sizes are small: a head
dim 512 K/V step costs about 12 ms per program here, so head dim 512 runs only at N <= 130.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sdvae_fast import fast, ops
from sdvae_fast.kernels.attention import attention_forward
from tests.helpers import assert_close, error_report

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _randn(shape, dtype, mean, generator):
    """Fresh normal values with a non-zero mean (never zeros), cast to dtype."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) + mean).to(dtype)


def _qkv(q_shape, dtype, n_kv=None, seed=0):
    """q of `q_shape` and k, v with the same shape but n_kv keys (default: as many as queries)."""
    g = torch.Generator().manual_seed(seed)
    kv_shape = list(q_shape)
    if n_kv is not None:
        kv_shape[-2] = n_kv
    return _randn(q_shape, dtype, 0.3, g), _randn(kv_shape, dtype, -0.2, g), _randn(kv_shape, dtype, 0.5, g)


def _sdpa64(q, k, v, scale=None):
    """The float64 reference: softmax(q k^T * scale) v from the same (rounded) inputs."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


def _low_precision_tol(q, k, v, reference, scale=None):
    """2x PyTorch's own SDPA error at q's dtype against `reference`, plus 1e-5."""
    torch_err = error_report(F.scaled_dot_product_attention(q, k, v, scale=scale), reference)["rel_l2"]
    return 2.0 * torch_err + 1e-5


def _nan_like(t):
    return torch.full(t.shape, float("nan"), dtype=t.dtype)


def _check_kernel(q, k, v, name, scale=None, config=None, out=None):
    """Launch into a NaN-filled output and compare with the float64 reference; returns the output."""
    if out is None:
        out = _nan_like(q)
    result = attention_forward(q, k, v, scale, out=out, config=config)
    assert result is out
    reference = _sdpa64(q, k, v, scale)
    assert_close(out, reference, rel_l2=_low_precision_tol(q, k, v, reference, scale), name=name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Kernel parity
# ---------------------------------------------------------------------------------------------------------------

SHAPES = {
    "3d_b3_n67_d64": (3, 67, 64),
    "4d_b1_h2_n130_d64": (1, 2, 130, 64),
    "3d_b3_n1_d64": (3, 1, 64),
    "4d_b1_h1_n130_d512": (1, 1, 130, 512),
    "3d_b3_n1_d512": (3, 1, 512),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_kernel_matches_float64_reference_ragged_n_and_head_dims(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    _check_kernel(q, k, v, name=f"attention {shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_queries_and_keys_of_different_lengths_and_custom_scale(dtype):
    q, k, v = _qkv((3, 67, 64), dtype, n_kv=130)
    _check_kernel(q, k, v, scale=0.3, name="cross-length attention")


@pytest.mark.parametrize("head_dim", [16, 48, 80, 144, 272])
def test_kernel_head_dims_that_are_not_powers_of_two_mask_the_padded_columns(head_dim):
    q, k, v = _qkv((2, 67, head_dim), torch.float32)
    _check_kernel(q, k, v, name=f"head dim {head_dim}")


# Tile configs forcing each code path: column split with chunked QK^T, query tile held in registers, unsplit
# head dim 512 (the accumulator-spilling alternative), and 16-wide tiles (many ragged K/V steps).
VARIANTS = {
    "split_d64_dv32_dk16": ((2, 67, 64), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=16, BLOCK_DV=32)),
    "held_q_d512_dk512_dv256": ((1, 40, 512), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=512, BLOCK_DV=256)),
    "unsplit_d512_dv512": ((1, 40, 512), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=512)),
    "split4_d512_dv128": ((1, 40, 512), dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=128, BLOCK_DV=128)),
    "tiles16_d64": ((3, 67, 64), dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DK=64, BLOCK_DV=64)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(VARIANTS), ids=list(VARIANTS))
def test_kernel_split_and_unsplit_variants_agree_with_reference(case, dtype):
    shape, config = VARIANTS[case]
    q, k, v = _qkv(shape, dtype, seed=1)
    _check_kernel(q, k, v, config=config, name=case)


# Head dims of 3 * 2^j (FLUX.2's small decoder: 384; its narrow test model: 96) run as three column chunks per
# program (DV_CHUNKS = 3) instead of being padded to the next power of two.
THREE_CHUNK_CASES = {
    "d384_default_b2_n37": ((2, 37, 384), None),
    "d384_split2_h2_n21": ((1, 2, 21, 384), dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DK=64, BLOCK_DV=64, DV_CHUNKS=3)),
    "d96_default_b3_n67": ((3, 67, 96), None),
    "d80_masked_in_last_chunk_b2_n19": ((2, 19, 80), None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(THREE_CHUNK_CASES), ids=list(THREE_CHUNK_CASES))
def test_head_dims_of_three_power_of_two_chunks_match_reference(case, dtype):
    shape, config = THREE_CHUNK_CASES[case]
    q, k, v = _qkv(shape, dtype, seed=2)
    _check_kernel(q, k, v, config=config, name=case)


def test_head_dim_384_runs_unpadded_as_three_chunks():
    """384 is covered by programs of exactly 384 (unsplit) or 192 (split) columns: no padding to 512."""
    from sdvae_fast.kernels import attention

    assert [attention.head_dim_block(d) for d in (48, 64, 80, 96, 128, 384, 400, 512)] == \
        [48, 64, 96, 96, 128, 384, 512, 512]
    for config in attention.attention_configs(384):
        columns = config.kwargs["BLOCK_DV"] * config.kwargs["DV_CHUNKS"]
        assert config.kwargs["DV_CHUNKS"] == 3 and 384 % columns == 0, config


def test_head_dim_384_configs_compile_for_hopper_without_spills():
    """Without a GPU: every head-dim-384 config (and 96's default) compiled for sm_90 with Triton's bundled ptxas
    uses at most 255 registers, no stack (spills), and no more shared memory than `_smem_bytes` estimates, which
    fits an H100/H200's 227 KiB."""
    code = textwrap.dedent("""
        import torch
        from sdvae_fast import kernel_report as kr
        from sdvae_fast.kernels import attention as A

        for d, configs in ((384, A.attention_configs(384)), (96, A.attention_configs(96)[:1])):
            q = torch.empty((1, 1, 4096, d), device="meta", dtype=torch.bfloat16)
            args = (q, q, q, q, *q.stride() * 4, 1, 4096, 4096, 0.1)
            for c in configs:
                consts = dict(HEAD_DIM=d, DOT_FP32=False, ROUND_BF16=False, INPUT_PRECISION="tf32", **c.kwargs)
                kernel = kr.compile_for_sm90(A._attention_fwd_kernel, args, consts, c.num_warps, c.num_stages)
                _, res = kr.disassemble(kernel.asm["cubin"])
                estimate = A._smem_bytes(c, A.head_dim_block(d), 2)
                print(d, c.kwargs, res, kernel.metadata.shared, estimate)
                assert res["REG"] <= 255 and res["STACK"] == 0, (d, c, res)
                assert kernel.metadata.shared <= estimate <= 227 * 1024, (d, c, kernel.metadata.shared, estimate)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0 and ("ptxas" in done.stderr or "cuobjdump" in done.stderr) and \
            "not found" in done.stderr.lower():
        pytest.skip("Triton's bundled ptxas/cuobjdump is missing on this machine")
    print(done.stdout)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_kernel_reads_strided_views_in_place_and_writes_strided_output():
    g = torch.Generator().manual_seed(2)
    # One (B, N, 3D) projection tensor, as the mid-block produces: q, k, v are views with row stride 3D.
    packed = _randn((3, 67, 3 * 64), torch.bfloat16, 0.2, g)
    q, k, v = packed.split(64, dim=-1)
    assert not q.is_contiguous()
    _check_kernel(q, k, v, name="views into packed qkv")
    # (B, N, H, D) memory read as (B, H, N, D); output written into a transposed (B, D, N) buffer.
    q4, k4, v4 = (_randn((1, 130, 2, 64), torch.float32, m, g).transpose(1, 2) for m in (0.3, -0.2, 0.5))
    _check_kernel(q4, k4, v4, name="(B, N, H, D) memory as 4-D")
    qt, kt, vt = (_randn((2, 64, 67), torch.float16, m, g).transpose(1, 2) for m in (0.3, -0.2, 0.5))
    out = torch.full((2, 64, 67), float("nan"), dtype=torch.float16).transpose(1, 2)  # (B, N, D), stride_n 1
    _check_kernel(qt, kt, vt, out=out, name="head-dim-major inputs and output")


def test_huge_row_strides_are_copied_so_int32_tile_offsets_stay_exact(monkeypatch):
    import sdvae_fast.kernels.attention as kernel_module

    # Lower the threshold instead of allocating 2^21-strided tensors: q, k and out take the copy path.
    monkeypatch.setattr(kernel_module, "_MAX_TILE_STRIDE", 100)
    q, k, v = _qkv((2, 67, 64), torch.float32, seed=14)
    q_wide = torch.full((2, 67, 128), float("nan"))
    q_wide[..., :64] = q
    out = torch.full((2, 67, 128), float("nan"))[..., :64]  # row stride 128 > 100
    _check_kernel(q_wide[..., :64], k, v, out=out, name="copied q and out")


def test_batched_output_is_bitwise_deterministic_and_batch_invariant():
    q, k, v = _qkv((3, 67, 64), torch.bfloat16, seed=3)
    batched = ops.attention(q, k, v)
    assert torch.equal(batched, ops.attention(q, k, v))
    for i in range(3):
        alone = ops.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1])
        assert torch.equal(alone, batched[i:i + 1]), f"sample {i} differs alone vs in a batch"


# ---------------------------------------------------------------------------------------------------------------
# The registered op: dispatch, fallback, memory, compile
# ---------------------------------------------------------------------------------------------------------------


def test_op_runs_the_kernel_for_supported_head_dims():
    q, k, v = _qkv((2, 67, 64), torch.float16, seed=4)
    assert torch.equal(ops.attention(q, k, v), attention_forward(q, k, v))
    assert ops.attention(q, k, v).is_contiguous()


@pytest.mark.parametrize(
    "shape, dtype",
    [((2, 67, 4), torch.float32), ((1, 2, 30, 4), torch.bfloat16), ((1, 20, 520), torch.float32),
     ((2, 20, 40), torch.float32), ((2, 67, 64), torch.float64)],
    ids=["head_dim4", "head_dim4_bf16_4d", "head_dim520", "head_dim40", "fp64"],
)
def test_unsupported_cases_fall_back_to_sdpa_without_error(shape, dtype):
    q, k, v = _qkv(shape, dtype, seed=5)
    out = ops.attention(q, k, v)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    expected = F.scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt)).to(dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, expected, rel_l2=1e-6, name=f"fallback {shape}")
    if shape[-1] == 4 and dtype == torch.float32:
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def _largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation that torch's profiler records while running fn."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([event.cpu_memory_usage for event in prof.events()] + [0])


def test_op_never_allocates_an_n_by_n_tensor():
    n, d = 512, 32
    q, k, v = _qkv((1, n, d), torch.float32, seed=6)
    bound = 2 * n * d * 4  # O(N*D): the output is n*d*4 bytes; an N x N fp32 score matrix is 16x the bound
    naive = _largest_allocation(lambda: torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)
    assert naive >= n * n * 4 > bound, "the profiler must see a materialised score matrix"
    ours = _largest_allocation(lambda: ops.attention(q, k, v))
    assert ours <= bound, f"largest allocation {ours} bytes exceeds O(N*D) bound {bound}"


def test_torch_compile_fullgraph_traces_the_op_on_cpu():
    q, k, v = _qkv((2, 67, 64), torch.float32, seed=7)

    def block(q, k, v):
        return ops.attention(q * 2.0, k, v) + 1.0

    # aot_eager traces through dynamo and AOTAutograd with the fake implementation (no C++ codegen: fast).
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), block(q, k, v))


def test_invalid_arguments_raise_clear_errors():
    q, k, v = _qkv((2, 67, 64), torch.float32)
    with pytest.raises(ValueError, match="share rank, batch"):
        ops.attention(q, k[:, :, :32], v)
    with pytest.raises(ValueError, match="must be \\(B, N, D\\)"):
        ops.attention(q[0], k, v)
    with pytest.raises(TypeError, match="q's dtype"):
        ops.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="multiple of 16"):
        attention_forward(q[..., :4], k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="BLOCK_DV"):
        attention_forward(q, k, v, config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=48))
    with pytest.raises(ValueError, match="DV_CHUNKS"):
        attention_forward(q, k, v, config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=32, DV_CHUNKS=2))
    with pytest.raises(ValueError, match="out must be"):
        attention_forward(q, k, v, out=torch.empty(2, 67, 32))


def test_without_interpreter_cpu_falls_back_and_launcher_explains():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from sdvae_fast import ops\n"
        "from sdvae_fast.kernels.attention import attention_forward\n"
        "q = torch.randn(1, 20, 64) + 0.3\n"
        "assert torch.equal(ops.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))\n"
        "try:\n"
        "    attention_forward(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    assert 'CUDA' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# VAE mid-block attention against diffusers' Attention
# ---------------------------------------------------------------------------------------------------------------


def _diffusers_vae_attention(channels, heads=1, seed=0, **overrides):
    """diffusers' mid-block Attention built as AutoencoderKL builds it, with random non-trivial parameters."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    kwargs = dict(
        query_dim=channels, heads=heads, dim_head=channels // heads, rescale_output_factor=1.0, eps=1e-6,
        norm_num_groups=32, spatial_norm_dim=None, residual_connection=True, bias=True, upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    kwargs.update(overrides)
    module = Attention(**kwargs).eval()
    with torch.no_grad():
        module.group_norm.weight.normal_(1.0, 0.2)
        module.group_norm.bias.normal_(0.1, 0.2)
        for lin in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
            lin.bias.normal_(0.05, 0.1)
    return module


def _block_reference(module, x):
    """float64 reference and PyTorch's own error at x's dtype (diffusers run in that dtype)."""
    with torch.no_grad():
        reference = copy.deepcopy(module).double()(x.double())
        if x.dtype == torch.float32:
            own = module(x)
        else:
            own = copy.deepcopy(module).to(x.dtype)(x)
    return reference, error_report(own, reference)["rel_l2"]


# (channels, height, width, batch, heads, dtype). The real width (512 channels, head dim 512) runs once, in bf16:
# its 512 -> 1536 projection costs seconds under the interpreter.
BLOCK_CASES = {
    "c64_7x9_b3_fp32": (64, 7, 9, 3, 1, torch.float32),
    "c64_7x9_b3_fp16": (64, 7, 9, 3, 1, torch.float16),
    "c64_7x9_b3_bf16": (64, 7, 9, 3, 1, torch.bfloat16),
    "c64_1x1_b3_fp32": (64, 1, 1, 3, 1, torch.float32),
    "c64_1x1_b1_bf16": (64, 1, 1, 1, 1, torch.bfloat16),
    "c64_7x9_b1_heads2_bf16": (64, 7, 9, 1, 2, torch.bfloat16),
    "c512_7x9_b1_bf16": (512, 7, 9, 1, 1, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES), ids=list(BLOCK_CASES))
def test_block_matches_diffusers_attention(case):
    channels, height, width, batch, heads, dtype = BLOCK_CASES[case]
    module = _diffusers_vae_attention(channels, heads)
    g = torch.Generator().manual_seed(8)
    x = _randn((batch, channels, height, width), dtype, 0.4, g)
    out = fast.vae_attention_block(x, module)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference, torch_err = _block_reference(module, x)
    assert_close(out, reference, rel_l2=2.0 * torch_err + 1e-5, name=f"block {case} {dtype}")


@pytest.mark.parametrize(
    "overrides", [dict(rescale_output_factor=2.0), dict(residual_connection=False)], ids=["rescale2", "no_residual"]
)
def test_block_honours_rescale_output_factor_and_residual_connection(overrides):
    module = _diffusers_vae_attention(64, seed=9, **overrides)
    x = _randn((2, 64, 7, 9), torch.float32, 0.4, torch.Generator().manual_seed(9))
    reference, torch_err = _block_reference(module, x)
    assert_close(fast.vae_attention_block(x, module), reference, rel_l2=2.0 * torch_err + 1e-5, name=str(overrides))


def test_block_accepts_non_contiguous_input():
    module = _diffusers_vae_attention(64, seed=10)
    wide = _randn((2, 64, 7, 18), torch.float32, 0.4, torch.Generator().manual_seed(10))
    x = wide[..., ::2]  # (2, 64, 7, 9), stride 2 along W
    reference, torch_err = _block_reference(module, x)
    assert_close(fast.vae_attention_block(x, module), reference, rel_l2=2.0 * torch_err + 1e-5, name="strided x")


def test_block_passes_views_of_one_qkv_tensor_to_attention(monkeypatch):
    module = _diffusers_vae_attention(64, seed=11)
    x = _randn((1, 64, 7, 9), torch.float32, 0.4, torch.Generator().manual_seed(11))
    seen = []
    real_attention = ops.attention

    def spy(q, k, v, scale=None):
        seen.append((q, k, v))
        return real_attention(q, k, v, scale)

    monkeypatch.setattr(ops, "attention", spy)
    fast.vae_attention_block(x, module)
    (q, k, v), = seen
    storage = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == storage and v.untyped_storage().data_ptr() == storage
    assert q.shape == (1, 63, 64) and q.stride() == (63 * 192, 192, 1)


def test_fused_qkv_weights_are_cached_until_a_weight_changes():
    module = _diffusers_vae_attention(64, seed=12)
    x = _randn((1, 64, 7, 9), torch.float32, 0.4, torch.Generator().manual_seed(12))
    w1, b1 = fast.fused_qkv_weights(module, torch.float32, "cpu")
    w2, b2 = fast.fused_qkv_weights(module, torch.float32, "cpu")
    assert w1 is w2 and b1 is b2, "an unchanged module must not be re-concatenated"
    fast.vae_attention_block(x, module)
    assert fast.fused_qkv_weights(module, torch.float32, "cpu")[0] is w1

    with torch.no_grad():
        module.to_k.weight.mul_(1.5)  # in place: same Parameter, new version
        module.to_v.bias.add_(0.3)
    w3, b3 = fast.fused_qkv_weights(module, torch.float32, "cpu")
    assert w3 is not w1
    assert torch.equal(w3[64:128, :, 0, 0], module.to_k.weight) and torch.equal(b3[128:], module.to_v.bias)
    reference, torch_err = _block_reference(module, x)
    assert_close(fast.vae_attention_block(x, module), reference, rel_l2=2.0 * torch_err + 1e-5, name="updated")

    module.load_state_dict({k: v + 0.01 for k, v in module.state_dict().items()})
    w4, _ = fast.fused_qkv_weights(module, torch.float32, "cpu")
    assert torch.equal(w4[:64, :, 0, 0], module.to_q.weight), "load_state_dict must invalidate the cache"


def test_block_invalid_arguments_raise_clear_errors():
    module = _diffusers_vae_attention(64, seed=13)
    with pytest.raises(ValueError, match="4-D"):
        fast.vae_attention_block(torch.randn(1, 64, 63), module)
    with pytest.raises(ValueError, match="group_norm"):
        fast.vae_attention_block(torch.randn(1, 32, 3, 3), module)
    with pytest.raises(TypeError, match="lacks"):
        fast.vae_attention_block(torch.randn(1, 64, 3, 3), torch.nn.Linear(64, 64))
