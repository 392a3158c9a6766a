"""Triton kernels of sdvae-fast, installed as `sdvae_fast.kernels`.

One file per fused op; each file holds its `@triton.jit` kernel(s) and a launcher that validates, allocates and
launches. Users call them through `sdvae_fast.ops`, which registers them as `torch.ops.sdvae_fast.*`.
"""
