"""Triton device functions shared by the kernels: Chan's merge of partial statistics, bf16 rounding.

Kept apart from `_common.py` (host-side helpers that import only torch) because importing this module imports
Triton and defines jitted functions.
"""
import triton
import triton.language as tl


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two partial statistics (count, mean, M2) into those of their union; M2 = sum of squared deviations.

    The pairwise update of Chan, Golub and LeVeque ("Updating formulae and a pairwise algorithm for computing
    sample variances", Stanford CS report STAN-CS-79-773, 1979):

        count = count_a + count_b;  delta = mean_b - mean_a
        mean = mean_a + delta * (count_b / count);  M2 = M2_a + M2_b + delta^2 * (count_a * count_b / count)

    Works elementwise on scalars or tensors of one shape (fp32), so it serves both as a running update (a loop
    merging tile after tile) and as each level of `chan_reduce`'s pairwise tree. An empty partial (count 0,
    mean 0, M2 0) is an exact identity on either side (the count is floored at 1 in the divisions, which changes
    nothing for real counts >= 1), so masked lanes may hold zeros.
    """
    count = count_a + count_b
    safe = tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


@triton.jit
def chan_reduce(count, mean, m2):
    """(count, mean, M2) of the union of the partials along the last axis of three (R, K) fp32 tensors -> (R,).

    K must be a power of two. A fixed pairwise tree of `chan_merge`: each level merges neighbours (2i, 2i+1),
    halving K, so the order depends only on K (deterministic, no atomics) and is the same on the GPU and in
    the interpreter (where it runs as log2(K) vector steps). Entries with count 0 (masked lanes) contribute
    nothing.
    """
    for _ in tl.static_range(16):
        if count.shape[1] > 1:
            # (R, K) -> (R, K/2, 2): neighbours 2i and 2i+1 side by side, split into two (R, K/2) halves.
            count_a, count_b = tl.split(tl.reshape(count, (count.shape[0], count.shape[1] // 2, 2)))
            mean_a, mean_b = tl.split(tl.reshape(mean, (mean.shape[0], mean.shape[1] // 2, 2)))
            m2_a, m2_b = tl.split(tl.reshape(m2, (m2.shape[0], m2.shape[1] // 2, 2)))
            count, mean, m2 = chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b)
    return tl.reshape(count, (count.shape[0],)), tl.reshape(mean, (mean.shape[0],)), tl.reshape(m2, (m2.shape[0],))


@triton.jit
def round_to_bf16(x):
    """fp32 values -> fp32 values rounded to the nearest bf16 (ties to even).

    Used under the interpreter only, where an fp32 -> bf16 cast or store truncates instead of rounding: rounding
    first makes the later truncation exact, so interpreter results match the GPU's round-to-nearest casts.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
