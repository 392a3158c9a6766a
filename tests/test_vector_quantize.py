"""The quantiser kernel (`kernels/vector_quantize.py`) and op (`ops.vector_quantize`) against diffusers' arithmetic:
`argmin(torch.cdist(z, E))` and `z + (E[idx] - z)`.

Indices must equal cdist's on exact inputs (small integers, constructed ties: lowest index) and on random inputs
wherever the best and second-best distances differ by more than fp32 rounding; values must be bitwise diffusers'
`z + (z_q - z)` for the chosen rows.
"""
import pytest
import torch

from sdvae_fast import ops
from sdvae_fast.kernels.vector_quantize import CONFIG, vector_quantize


def _cdist_argmin(z: torch.Tensor, codebook: torch.Tensor):
    """diffusers' VectorQuantizer.forward indices and values for z (N, D, H, W): (indices (N, H, W), z_q)."""
    n, dim, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (N*H*W, D)
    idx = torch.argmin(torch.cdist(flat.double(), codebook.double()), dim=1)  # exact distances in fp64
    return idx.view(n, h, w), _gathered(z, codebook, idx.view(n, h, w))


def _gathered(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """diffusers' `z + (z_q - z)` for given indices (N, H, W), as contiguous NCHW."""
    zl = z.permute(0, 2, 3, 1)  # (N, H, W, D)
    z_q = codebook[idx]  # (N, H, W, D)
    return (zl + (z_q - zl)).permute(0, 3, 1, 2).contiguous()


def _near_tie(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, H, W) mask of pixels whose two smallest squared distances differ by less than fp32 rounding of the
    expansion ||z||^2 - 2 z.e + ||e||^2 (a few ulps of its largest term)."""
    n, dim, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, dim).double()
    e = codebook.double()
    d2 = torch.cdist(flat, e) ** 2  # (P, K)
    two = d2.topk(2, dim=1, largest=False).values
    scale = (flat * flat).sum(1) + (e * e).sum(1).max() + 2 * (flat.abs() @ e.abs().T).max(1).values
    return ((two[:, 1] - two[:, 0]) <= 64 * 2.0 ** -24 * scale).view(n, h, w)


def _run(z, codebook):
    """The launcher with NaN-filled outputs (every element must be written)."""
    n, d, h, w = z.shape
    out = torch.full((n, d, h, w), float("nan"), dtype=z.dtype)
    idx = torch.full((n, h, w), -7, dtype=torch.int64)
    return vector_quantize(z, codebook, out=out, indices=idx)


def test_integer_inputs_give_cdist_indices_with_lowest_index_on_exact_ties():
    gen = torch.Generator().manual_seed(0)
    # ragged everything: 2 images of 9x11 = 99 pixels (a full and a ragged 64-pixel tile each), D = 3,
    # K = 150 (three 64-row codebook tiles, the last ragged); small integers: exact distances, many ties.
    z = torch.randint(-3, 4, (2, 3, 9, 11), generator=gen).float()
    codebook = torch.randint(-3, 4, (150, 3), generator=gen).float()
    # constructed ties: duplicate rows in different codebook tiles, and mirror pairs around a pixel
    codebook[140] = codebook[3]
    codebook[70] = codebook[3]
    z[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0])
    codebook[100] = torch.tensor([1.0, 0.0, 0.0])
    codebook[5] = torch.tensor([-1.0, 0.0, 0.0])
    codebook[0] = torch.tensor([9.0, 9.0, 9.0])
    z_q, idx = _run(z, codebook)
    ref_idx, ref_q = _cdist_argmin(z, codebook)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(z_q, ref_q)
    assert 140 not in idx and 70 not in idx, "a duplicate of row 3 must never win over row 3"
    # pixel (0, 0, 0) = origin: rows 5 and 100 (and any other unit vector) tie; the lowest such index wins
    d0 = ((codebook - z[0, :, 0, 0]) ** 2).sum(1)
    assert int(idx[0, 0, 0]) == int(torch.nonzero(d0 == d0.min())[0])


def test_random_inputs_match_cdist_except_near_ties_batch_and_strides():
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(200, 4, generator=gen)
    # channels_last, batch 3, 67 pixels per image (one full and one ragged M tile)
    z = torch.randn(3, 4, 67, 1, generator=gen).contiguous(memory_format=torch.channels_last)
    z_q, idx = _run(z, codebook)
    ref_idx, _ = _cdist_argmin(z, codebook)
    ok = ~_near_tie(z, codebook)
    assert ok.float().mean() > 0.95
    assert torch.equal(idx[ok], ref_idx[ok])
    assert torch.equal(z_q, _gathered(z, codebook, idx))
    # a non-contiguous view of z and a transposed codebook view give the same result
    zv = torch.randn(2, 8, 6, 5, generator=gen)[:, ::2]
    cb = torch.randn(4, 90, generator=gen).T
    z_q, idx = _run(zv, cb)
    assert torch.equal(z_q, _gathered(zv, cb, idx))
    ok = ~_near_tie(zv, cb)
    assert torch.equal(idx[ok], _cdist_argmin(zv, cb)[0][ok])


def test_wide_codes_walk_the_channel_axis_in_chunks():
    """D above the D chunk cap (MAX_BLOCK_D) is summed over several chunks; integer values keep it exact."""
    gen = torch.Generator().manual_seed(2)
    dim = CONFIG["MAX_BLOCK_D"] + 9
    z = torch.randint(-2, 3, (1, dim, 3, 4), generator=gen).float()
    codebook = torch.randint(-2, 3, (20, dim), generator=gen).float()
    codebook[11] = codebook[2]
    z_q, idx = _run(z, codebook)
    ref_idx, ref_q = _cdist_argmin(z, codebook)
    assert torch.equal(idx, ref_idx) and torch.equal(z_q, ref_q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_values_are_diffusers_arithmetic_in_that_dtype(dtype):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 5, 6, generator=gen).to(dtype)
    codebook = torch.randn(40, 4, generator=gen).to(dtype)
    z_q, idx = _run(z, codebook)
    # distances in fp32 of the low-precision values
    ok = ~_near_tie(z.float(), codebook.float())
    assert torch.equal(idx[ok], _cdist_argmin(z.float(), codebook.float())[0][ok])
    assert z_q.dtype == dtype and torch.equal(z_q, _gathered(z, codebook, idx))


def test_op_kernel_and_reference_agree_and_fp64_uses_the_reference():
    gen = torch.Generator().manual_seed(4)
    z = torch.randint(-3, 4, (2, 3, 4, 5), generator=gen).float()
    codebook = torch.randint(-3, 4, (33, 3), generator=gen).float()
    z_q, idx = ops.vector_quantize(z, codebook)
    ref_q, ref_idx = ops._vector_quantize_reference(z, codebook)
    assert torch.equal(idx, ref_idx) and torch.equal(z_q, ref_q)
    q64, i64 = ops.vector_quantize(z.double(), codebook.double())
    assert q64.dtype == torch.float64 and torch.equal(i64, idx)
    # the op traces under torch.compile's fake tensors
    fake = torch.library.opcheck(torch.ops.sdvae_fast.vector_quantize.default, (z, codebook),
                                 test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in fake.values())


def test_bad_inputs_name_the_argument():
    z = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"codebook must be \(K, 4\)"):
        ops.vector_quantize(z, torch.randn(8, 3))
    with pytest.raises(ValueError, match="z must be 4-D"):
        ops.vector_quantize(torch.randn(4, 3, 3), torch.randn(8, 4))
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        ops.vector_quantize(z, torch.randn(8, 4, 1))
    with pytest.raises(ValueError, match="K >= 1"):
        ops.vector_quantize(z, torch.randn(0, 4))
    with pytest.raises(TypeError, match="codebook must have z's dtype"):
        ops.vector_quantize(z, torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"codebook must be \(K, 4\)"):
        vector_quantize(z, torch.randn(8, 5))
