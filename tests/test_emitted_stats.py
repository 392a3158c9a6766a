"""GroupNorm statistics emitted by the conv epilogue (`emit_stats=`, kernels/conv.py EMIT_STATS + the merge kernel
in kernels/group_norm.py), and their use on the fast path (sdvae_fast.fast.EMIT_GN_STATS).

The emitted (mean, rstd) must be the statistics of the output *as stored* (rounded to its dtype): they are checked
against float64 `var_mean` of the returned tensor, which is what the separate statistics pass would read. Runs under
the Triton interpreter on CPU.
"""
import pytest
import torch

from tests.helpers import assert_close
from sdvae_fast import fast, ops
from sdvae_fast.kernels import conv as conv_kernels
from sdvae_fast.kernels._common import derived_weights

from tests.test_fast_path import images_batch3, latents_batch3, make_diffusers_vae, run_profiled


def _stats_float64(y: torch.Tensor, num_groups: int, eps: float = 1e-6):
    """float64 (mean, rstd) of each (sample, group) of the stored tensor y (N, C, H, W)."""
    yg = y.double().reshape(y.shape[0], num_groups, -1)  # (N, G, C/G*H*W)
    var, mean = torch.var_mean(yg, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _check_stats(y, stats, num_groups, name, rtol=2e-6):
    """mean within rtol of the spread-plus-mean scale, rstd within rtol relative, against float64 of y."""
    mean, rstd = stats
    assert mean.shape == rstd.shape == (y.shape[0], num_groups) and mean.dtype == torch.float32
    mean64, rstd64 = _stats_float64(y, num_groups)
    scale = mean64.abs() + 1 / rstd64
    mean_err = ((mean.double() - mean64).abs() / scale).max().item()
    rstd_err = ((rstd.double() - rstd64).abs() / rstd64).max().item()
    print(f"{name}: mean err {mean_err:.2e}, rstd rel err {rstd_err:.2e} (tol {rtol:.0e})")
    assert mean_err <= rtol and rstd_err <= rtol, name


def _image(shape, dtype, seed, mean=0.5):
    torch.manual_seed(seed)
    return (torch.randn(shape) + mean).to(dtype)


# (name, n, c_in, c_out, (h, w), mode, num_groups of the *output*, dtype). Channels per group 2, 3, 10, 16, 32
# (runs of 16: two per group), 1x1, stride 2, upsample; odd sizes; batch 1 and 3.
EMIT_CASES = [
    ("gsc3x3-residual-fp32-b3-13x7-cpg2", 3, 16, 32, (13, 7), "gsc", 16, torch.float32),
    ("gsc3x3-bf16-b1-9x11-cpg3", 1, 16, 48, (9, 11), "gsc", 16, torch.bfloat16),
    ("plain3x3-fp16-b3-5x6-cpg10", 3, 16, 40, (5, 6), "plain", 4, torch.float16),
    ("plain1x1-bf16-b1-7x5-cpg32", 1, 32, 64, (7, 5), "1x1", 2, torch.bfloat16),
    ("downsample-fp32-b1-13x7-cpg16", 1, 16, 64, (13, 7), "down", 4, torch.float32),
    ("upsample-bf16-b3-5x3-cpg4", 3, 16, 32, (5, 3), "up", 8, torch.bfloat16),
    ("upsample-fp32-b1-4x7-cpg1", 1, 16, 16, (4, 7), "up", 16, torch.float32),
]


def _run_case(n, c_in, c_out, hw, mode, num_groups, dtype, seed=0, emit=True, take=slice(None)):
    """One conv of `mode` through the public op on fresh inputs of batch n (then `take` of those images), with
    emit_stats (returns (y, stats)) or without (returns y)."""
    x = _image((n, c_in, *hw), dtype, seed)[take]
    torch.manual_seed(seed + 1)
    k = 1 if mode == "1x1" else 3
    weight = (torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).to(dtype)
    bias = (torch.randn(c_out) * 0.3 + 0.2).to(dtype)
    emit_stats = (num_groups, 1e-6) if emit else None
    if mode == "up":
        return ops.upsample_conv2d(x, weight, bias, emit_stats=emit_stats)
    kwargs = dict(padding=1 if k == 3 else 0)
    if mode == "gsc":
        gamma, beta = torch.rand(c_in) + 0.5, torch.randn(c_in) * 0.2
        h_out, w_out = hw
        kwargs.update(norm_weight=gamma.to(dtype), norm_bias=beta.to(dtype), num_groups=8,
                      residual=_image((n, c_out, h_out, w_out), dtype, seed + 2, mean=-0.3)[take])
    if mode == "down":
        kwargs.update(stride=2, padding=(0, 1, 0, 1))
    return ops.gn_silu_conv2d(x, weight, bias, emit_stats=emit_stats, **kwargs)


@pytest.mark.parametrize("case", EMIT_CASES, ids=[c[0] for c in EMIT_CASES])
def test_emitted_stats_equal_float64_statistics_of_the_stored_output(case):
    name, n, c_in, c_out, hw, mode, num_groups, dtype = case
    kind = "upsample_pack" if mode == "up" else "conv_pack"  # the upsample conv packs its folded phases
    packs = derived_weights.builds[kind]
    y, stats = _run_case(n, c_in, c_out, hw, mode, num_groups, dtype)
    assert derived_weights.builds[kind] == packs + 1, "the kernel path did not run"
    _check_stats(y, stats, num_groups, name)
    # Emitting statistics leaves the output itself bitwise unchanged.
    assert torch.equal(_run_case(n, c_in, c_out, hw, mode, num_groups, dtype, emit=False), y)


def test_emitted_stats_stay_accurate_when_the_mean_dwarfs_the_spread():
    """Output mean about 1000 with a spread of about 1: per-tile centred M2 and Chan's merges keep rstd within
    1e-7 * |mean| / std (the fp32 rounding of the partial means; the separate statistics pass, which subtracts
    a shared shift first, is exact here)."""
    torch.manual_seed(3)
    x = torch.randn(1, 16, 11, 9)
    weight = torch.randn(32, 16, 3, 3) / 12
    bias = torch.full((32,), 1000.0) + torch.randn(32) * 0.1
    y, stats = ops.gn_silu_conv2d(x, weight, bias, emit_stats=(8, 1e-6))
    assert y.mean().item() > 900
    _check_stats(y, stats, 8, "mean 1000", rtol=1e-4)


def test_image_alone_emits_bitwise_the_statistics_it_gets_in_a_batch():
    for mode in ("gsc", "up"):
        _, (mean3, rstd3) = _run_case(3, 16, 32, (7, 9), mode, 8, torch.bfloat16, seed=5)
        _, (mean1, rstd1) = _run_case(3, 16, 32, (7, 9), mode, 8, torch.bfloat16, seed=5, take=slice(1, 2))
        assert mean1.shape == (1, 8)
        assert torch.equal(mean1, mean3[1:2]) and torch.equal(rstd1, rstd3[1:2]), mode


def test_emit_stats_with_groups_not_dividing_the_output_channels_names_both_numbers():
    x = _image((1, 16, 4, 4), torch.float32, seed=6)
    with pytest.raises(ValueError, match=r"output channels \(24\).*num_groups \(5\)"):
        ops.gn_silu_conv2d(x, torch.randn(24, 16, 3, 3), emit_stats=(5, 1e-6))
    with pytest.raises(TypeError, match="emit_stats"):
        ops.upsample_conv2d(x, torch.randn(24, 16, 3, 3), emit_stats=8)
    with pytest.raises(ValueError, match="stats_groups"):
        conv_kernels.gn_silu_conv2d(x, torch.randn(24, 16, 3, 3), stats_groups=5)


def test_reference_fallback_returns_the_statistics_too():
    """fp64 runs the PyTorch reference; it returns the output's statistics from the statistics op (float64)."""
    for mode in ("gsc", "up"):
        y, (mean, rstd) = _run_case(2, 16, 32, (5, 4), mode, 8, torch.float64, seed=7)
        mean64, rstd64 = _stats_float64(y, 8)
        assert mean.dtype == torch.float64
        assert torch.allclose(mean, mean64, rtol=1e-12, atol=1e-12) and torch.allclose(rstd, rstd64, rtol=1e-12)


@pytest.mark.parametrize("mode", ["gsc", "up"])
def test_convs_return_their_raw_partials_which_merge_across_bands(mode):
    """`emit_partials=True`: the merged (count, mean, M2) of each (sample, group) of the stored output, with the
    emitted mean bitwise and (merged alone) the emitted rstd bitwise; bands of the output merged in order with
    `merge_group_norm_partials` give its float64 statistics. fp64 (the reference) returns float64 partials."""
    packs = derived_weights.builds["conv_pack" if mode == "gsc" else "upsample_pack"]
    n, c_in, c_out, hw, groups = 2, 16, 32, (7, 5), 8
    x = _image((n, c_in, *hw), torch.bfloat16, seed=8)
    weight = (torch.randn(c_out, c_in, 3, 3) / 12).to(torch.bfloat16)
    if mode == "gsc":
        y, stats, part = ops.gn_silu_conv2d(x, weight, norm_weight=torch.ones(c_in), num_groups=4,
                                            emit_stats=(groups, 1e-6), emit_partials=True)
    else:
        y, stats, part = ops.upsample_conv2d(x, weight, emit_stats=(groups, 1e-6), emit_partials=True)
    assert derived_weights.builds["conv_pack" if mode == "gsc" else "upsample_pack"] == packs + 1
    assert all(t.shape == (n, groups) and t.dtype == torch.float32 for t in part)
    assert torch.equal(part.count, torch.full((n, groups), float(c_out // groups * y.shape[2] * y.shape[3])))
    assert torch.equal(part.mean, stats[0])
    merged = ops.merge_group_norm_partials([part], 1e-6)
    assert torch.equal(merged[0], stats[0]) and torch.equal(merged[1], stats[1])
    rows = y.shape[2] // 3
    bands = [ops.group_norm_partials(y[:, :, :rows], groups), ops.group_norm_partials(y[:, :, rows:], groups)]
    _check_stats(y, ops.merge_group_norm_partials(bands, 1e-6), groups, f"{mode} bands")
    y64, stats64, part64 = (ops.upsample_conv2d(x.double(), weight.double(), emit_stats=(groups, 1e-6),
                                                emit_partials=True) if mode == "up" else
                            ops.gn_silu_conv2d(x.double(), weight.double(), emit_stats=(groups, 1e-6),
                                               emit_partials=True))
    assert part64.m2.dtype == torch.float64
    assert torch.allclose(ops.merge_group_norm_partials([part64], 1e-6)[1], stats64[1], rtol=1e-12)
    with pytest.raises(ValueError, match="emit_partials"):
        ops.upsample_conv2d(x, weight, emit_partials=True)
    with pytest.raises(ValueError, match="stats_partials"):
        conv_kernels.upsample_conv2d(x, weight, stats_partials=True)


def test_vae_attention_block_takes_and_emits_statistics():
    """The mid-block attention uses the statistics it is given and emits those of its output."""
    vae = make_diffusers_vae(seed=4)
    attn = vae.decoder.mid_block.attentions[0]
    x = _image((2, 64, 3, 5), torch.float32, seed=8)
    plain = fast.vae_attention_block(x, attn)
    given = ops.group_norm_stats(x, attn.group_norm.num_groups, attn.group_norm.eps)
    y, stats = fast.vae_attention_block(x, attn, stats=given, emit_stats=(8, 1e-6))
    assert torch.equal(y, plain)
    _check_stats(y, stats, 8, "attention block")


@pytest.fixture(scope="module")
def decode_both_ways():
    """Fast decode and encode of a narrow full-depth VAE with and without emitted statistics, profiled."""
    vae = make_diffusers_vae(seed=0)
    z, x = latents_batch3()[:1], images_batch3()[:1]  # batch invariance is tested apart (below)
    runs = {}
    try:
        for emit in (True, False):
            fast.EMIT_GN_STATS = emit
            with torch.no_grad():
                runs[emit] = (run_profiled(fast.decode_sample, vae, z), run_profiled(fast.encode_moments, vae, x))
    finally:
        fast.EMIT_GN_STATS = True
    with torch.no_grad():
        expected = (vae.decode(z).sample, vae._encode(x))
    return runs, expected


def test_fast_path_with_emitted_stats_runs_no_separate_statistics_pass(decode_both_ways):
    runs, _ = decode_both_ways
    for (_, names_decode), (_, names_encode) in (runs[True],):
        assert "sdvae_fast::group_norm_stats" not in names_decode | names_encode
        assert "sdvae_fast::upsample_conv2d_stats" in names_decode
        assert "sdvae_fast::gn_silu_conv2d_stats" in names_decode & names_encode
    (_, names_decode), (_, names_encode) = runs[False]
    assert "sdvae_fast::group_norm_stats" in names_decode & names_encode
    assert not any(name.endswith("_stats") and name != "sdvae_fast::group_norm_stats"
                   for name in names_decode | names_encode if name.startswith("sdvae_fast::"))


def test_fast_path_with_and_without_emitted_stats_matches_diffusers(decode_both_ways):
    runs, (decoded, moments) = decode_both_ways
    for emit in (True, False):
        (y, _), (m, _) = runs[emit]
        assert_close(y, decoded, rel_l2=1e-4, name=f"decode emit={emit}")
        assert_close(m, moments, rel_l2=1e-4, name=f"encode emit={emit}")
    # The two ways differ only in the statistics' summation order.
    assert_close(runs[True][0][0], runs[False][0][0], rel_l2=1e-5, name="decode emit vs not")
