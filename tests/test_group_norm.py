"""GroupNorm statistics kernel (kernels/group_norm.py) through `sdvae_fast.ops.group_norm_stats`.

Runs under the Triton interpreter on CPU. References are float64 statistics of the same (low-precision) inputs.
"""
import pytest
import torch

from helpers import assert_close
from sdvae_fast import ops
from sdvae_fast.kernels import group_norm as gn_kernels

# Stats are fp32: a few ulps of fp32 relative error against the float64 statistics of the same inputs.
STATS_REL = 2e-6


def _reference(x, num_groups, eps=1e-6):
    return ops._group_norm_stats_reference(x.double(), num_groups, eps)


def _random_image(shape, dtype, mean=0.7, std=1.3, layout="nchw"):
    """Fresh random input with a non-zero mean and a per-channel offset, in the requested memory layout."""
    n, c, h, w = shape
    x = torch.randn(shape) * std + mean + torch.linspace(-1, 1, c)[None, :, None, None]
    if layout == "channels_last":
        return x.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        # A view with a step on W and an offset channel slice of a wider tensor.
        wide = torch.randn(n, c + 3, h, 2 * w) * std + mean
        wide[:, 1:1 + c, :, ::2] = x
        return wide.to(dtype)[:, 1:1 + c, :, ::2]
    return x.to(dtype)


@pytest.mark.parametrize(
    "shape, num_groups, dtype, layout",
    [
        ((3, 8, 13, 7), 8, torch.float32, "nchw"),  # 1 channel per group
        ((1, 32, 13, 7), 16, torch.bfloat16, "channels_last"),  # 2 per group
        ((3, 12, 5, 9), 4, torch.float16, "noncontiguous"),  # 3 per group (CASES C06)
        ((1, 40, 7, 6), 4, torch.bfloat16, "nchw"),  # 10 per group (C06: C=320, G=32 has 10)
        ((3, 64, 6, 5), 4, torch.float32, "channels_last"),  # 16 per group
    ],
    ids=["cpg1-fp32-nchw-b3", "cpg2-bf16-cl-b1", "cpg3-fp16-noncontig-b3", "cpg10-bf16-nchw", "cpg16-fp32-cl-b3"],
)
def test_stats_match_float64_reference_for_every_channels_per_group(shape, num_groups, dtype, layout):
    x = _random_image(shape, dtype, layout=layout)
    mean, rstd = ops.group_norm_stats(x, num_groups, eps=1e-6)
    ref_mean, ref_rstd = _reference(x, num_groups)
    assert mean.shape == rstd.shape == (shape[0], num_groups) and mean.dtype == rstd.dtype == torch.float32
    assert_close(mean, ref_mean, rel_l2=STATS_REL, atol=1e-6, name="mean")
    assert_close(rstd, ref_rstd, rel_l2=STATS_REL, name="rstd")


def test_many_splits_merge_to_the_single_pass_statistics():
    """Chan's merge of 13 partial triples (uneven last split) equals the float64 statistics."""
    x = _random_image((1, 12, 11, 13), torch.float32)
    for splits in (1, 13):
        mean, rstd = gn_kernels.group_norm_stats(x, 2, 1e-6, num_splits=splits)
        ref_mean, ref_rstd = _reference(x, 2)
        assert_close(mean, ref_mean, rel_l2=STATS_REL, name=f"mean splits={splits}")
        assert_close(rstd, ref_rstd, rel_l2=STATS_REL, name=f"rstd splits={splits}")


def test_stats_stay_exact_when_mean_dwarfs_std():
    """Mean 1e4, std 1: the shifted-data Chan merge keeps rstd at fp32 accuracy (E[x^2]-E[x]^2 would not)."""
    x = torch.randn(1, 16, 12, 10) * (1 + torch.rand(1, 16, 1, 1)) + 1e4
    mean, rstd = gn_kernels.group_norm_stats(x, 4, 1e-6, num_splits=9)
    ref_mean, ref_rstd = _reference(x, 4)
    assert_close(mean, ref_mean, rel_l2=1e-7, name="mean")
    assert_close(rstd, ref_rstd, rel_l2=1e-6, name="rstd")


def test_no_lane_reads_outside_its_group():
    """Groups with very different means, inside a wider tensor whose neighbouring channels are NaN."""
    n, c, g = 2, 30, 10  # 3 channels per group
    wide = torch.full((n, c + 2, 6, 7), float("nan"))
    group_means = torch.arange(g).repeat_interleave(c // g).float() * 100.0
    wide[:, 1:1 + c] = torch.randn(n, c, 6, 7) + group_means[None, :, None, None]
    x = wide[:, 1:1 + c]
    mean, rstd = ops.group_norm_stats(x, g)
    ref_mean, ref_rstd = _reference(x, g)
    assert_close(mean, ref_mean, rel_l2=STATS_REL, name="mean")
    assert_close(rstd, ref_rstd, rel_l2=STATS_REL, name="rstd")


def test_image_alone_equals_its_slice_of_a_batch_bitwise():
    x = _random_image((3, 32, 9, 7), torch.bfloat16, layout="channels_last")
    batch_mean, batch_rstd = ops.group_norm_stats(x, 8)
    alone_mean, alone_rstd = ops.group_norm_stats(x[2:3], 8)
    assert torch.equal(batch_mean[2:3], alone_mean) and torch.equal(batch_rstd[2:3], alone_rstd)


def test_two_runs_are_bitwise_equal():
    x = _random_image((1, 8, 10, 11), torch.float16)
    first = gn_kernels.group_norm_stats(x, 2, 1e-6, num_splits=5)
    second = gn_kernels.group_norm_stats(x, 2, 1e-6, num_splits=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_split_count_depends_on_per_sample_sizes_only():
    """The choice is a function of (C, G, H, W); at real sizes it spreads a group over many programs."""
    assert gn_kernels.choose_num_splits(512, 32, 64, 64) == gn_kernels.choose_num_splits(512, 32, 64, 64)
    assert gn_kernels.choose_num_splits(128, 32, 512, 512) > 16
    assert gn_kernels.choose_num_splits(32, 32, 1, 1) == 1


def test_channels_not_divisible_by_groups_raises_naming_both_numbers():
    x = torch.randn(1, 50, 4, 4)
    with pytest.raises(ValueError, match=r"50.*32"):
        ops.group_norm_stats(x, 32)
    with pytest.raises(ValueError, match=r"50.*32"):
        gn_kernels.group_norm_stats(x, 32)


def test_launcher_rejects_bad_arguments_with_clear_errors():
    with pytest.raises(ValueError, match="4-D"):
        gn_kernels.group_norm_stats(torch.randn(4, 4), 2)
    with pytest.raises(TypeError, match="float64"):
        gn_kernels.group_norm_stats(torch.randn(1, 4, 2, 2, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="num_splits"):
        gn_kernels.group_norm_stats(torch.randn(1, 4, 2, 2), 2, num_splits=5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gn_kernels.group_norm_stats("not a tensor", 2)


def test_float64_input_uses_the_reference():
    x = _random_image((2, 8, 5, 5), torch.float64)
    mean, rstd = ops.group_norm_stats(x, 4)
    ref_mean, ref_rstd = _reference(x, 4)
    assert mean.dtype == torch.float64
    assert torch.equal(mean, ref_mean) and torch.equal(rstd, ref_rstd)


def test_raw_partials_are_the_statistics_before_the_rstd():
    """`group_norm_partials`: count C/G*H*W, the mean, and m2 = biased variance * count (float64 reference);
    merging the single partial gives `group_norm_stats`' (mean, rstd) bitwise (same kernels, IEEE fp32 both
    sides under the interpreter)."""
    x = _random_image((2, 12, 11, 13), torch.bfloat16, layout="channels_last")
    for splits in (1, 13):
        part = gn_kernels.group_norm_partials(x, 3, num_splits=splits)
        assert all(t.shape == (2, 3) and t.dtype == torch.float32 for t in part)
        xg = x.double().reshape(2, 3, -1)  # (N, G, C/G*H*W)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
        assert torch.equal(part.count, torch.full((2, 3), 4.0 * 11 * 13))
        assert_close(part.mean, mean, rel_l2=STATS_REL, name=f"mean splits={splits}")
        assert_close(part.m2, var * xg.shape[-1], rel_l2=STATS_REL, name=f"m2 splits={splits}")
        merged = ops.merge_group_norm_partials([part], 1e-6)
        stats = gn_kernels.group_norm_stats(x, 3, 1e-6, num_splits=splits)
        assert torch.equal(merged[0], stats[0]) and torch.equal(merged[1], stats[1]), splits


def test_band_partials_merge_to_the_whole_image_statistics_deterministically():
    """Three bands of rows (as ranks of patch parallelism would hold them), merged in order, give the whole
    image's float64 statistics to fp32 accuracy; the same list merges to the same bits; an fp64 input runs the
    reference and merges in float64."""
    x = _random_image((2, 16, 17, 6), torch.float32, mean=50.0)
    bands = [x[:, :, :5], x[:, :, 5:6], x[:, :, 6:]]
    parts = [ops.group_norm_partials(b, 4) for b in bands]
    mean, rstd = ops.merge_group_norm_partials(parts, 1e-6)
    ref_mean, ref_rstd = _reference(x, 4)
    assert_close(mean, ref_mean, rel_l2=STATS_REL, name="mean")
    assert_close(rstd, ref_rstd, rel_l2=STATS_REL, name="rstd")
    again = ops.merge_group_norm_partials([tuple(p) for p in parts], 1e-6)
    assert torch.equal(again[0], mean) and torch.equal(again[1], rstd)
    parts64 = [ops.group_norm_partials(b.double(), 4) for b in bands]
    mean64, rstd64 = ops.merge_group_norm_partials(parts64, 1e-6)
    assert mean64.dtype == torch.float64
    assert torch.allclose(mean64, ref_mean, rtol=1e-12) and torch.allclose(rstd64, ref_rstd, rtol=1e-12)


def test_merge_group_norm_partials_rejects_bad_partials():
    part = ops.group_norm_partials(torch.randn(1, 4, 3, 3), 2)
    with pytest.raises(ValueError, match="at least one"):
        ops.merge_group_norm_partials([])
    with pytest.raises(ValueError, match=r"\(N, G\)"):
        ops.merge_group_norm_partials([part, ops.group_norm_partials(torch.randn(2, 4, 3, 3), 2)])
    with pytest.raises(TypeError, match="float32"):
        ops.merge_group_norm_partials([part, ops.GroupNormPartials(*(t.double() for t in part))])
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.merge_group_norm_partials([(part.count, part.mean, 1.0)])
