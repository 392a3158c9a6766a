"""Golden outputs that pin the fast path's behaviour across refactors (issue: one owner per decision).

A seeded narrow, two-level VAE (our `AutoencoderKL`, widths 32/64, 8 groups: every unit type once, a shortcut conv,
a downsample, an upsample and the mid-block attention) encodes 2 images of 25x16 pixels and decodes 2 latents of
5x3, on both backends ("torch": the reference modules,
"triton": the kernels under the interpreter), in fp32 and bf16, with the conv epilogues emitting GroupNorm
statistics and without. `record()` computes every case; `python -m tests.golden` writes them to
`tests/data/golden_outputs.safetensors` (with the SHA-256 of each tensor's bytes in the metadata), which
`tests/test_golden.py` compares bitwise. Regenerate only when a change of numbers is intended, and say which
outputs changed and by how much in the commit.
"""
import hashlib
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

GOLDEN_PATH = Path(__file__).parent / "data" / "golden_outputs.safetensors"
CONFIG = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_vae():
    """The seeded narrow VAE in fp32, eval mode, with randomised (non-default) norms and biases."""
    from sdvae_fast import AutoencoderKL, StandaloneAutoencoderKL

    torch.manual_seed(0)
    # The weights are drawn in the reference tree's construction order (as when the goldens were recorded), then
    # assigned to the class users get (with diffusers installed, diffusers' module tree), built on meta (no draws).
    weights = StandaloneAutoencoderKL(**CONFIG).state_dict()
    with torch.device("meta"):
        vae = AutoencoderKL(**CONFIG)
    vae.load_state_dict(weights, assign=True)
    vae = vae.eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1 + 0.05)
            elif p.dim() == 1:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return vae


def inputs():
    """(images (2, 3, 25, 16) in [-0.8, 1.2], latents (2, 4, 5, 3) with mean 0.5), fp32, seeded."""
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 25, 16, generator=g) * 2 - 0.8
    latents = torch.randn(2, 4, 5, 3, generator=g) + 0.5
    return images, latents


def cases():
    """(name, backend, dtype, emit_stats) of every recorded case."""
    out = [(f"torch_{d}", "torch", d, None) for d in DTYPES]
    out += [(f"triton_{d}_{'emit' if e else 'pass'}", "triton", d, e) for d in DTYPES for e in (True, False)]
    return out


def record(names=None) -> dict:
    """{'<case>.moments': (2, 8, 12, 8), '<case>.images': (2, 3, 10, 6)} for every case (or the cases named in
    `names`), in the case's dtype."""
    from sdvae_fast import fast

    images, latents = inputs()
    base = make_vae()
    out = {}
    saved = fast.EMIT_GN_STATS
    try:
        for name, backend, dtype, emit in cases():
            if names is not None and name not in names:
                continue
            vae = make_vae().to(DTYPES[dtype])
            vae.load_state_dict(base.to(DTYPES[dtype]).state_dict())
            vae.set_backend(backend)
            if emit is not None:
                fast.EMIT_GN_STATS = emit
            with torch.no_grad():
                out[f"{name}.moments"] = vae.encode(images.to(DTYPES[dtype])).latent_dist.parameters.contiguous()
                out[f"{name}.images"] = vae.decode(latents.to(DTYPES[dtype])).sample.contiguous()
            base = make_vae()
    finally:
        fast.EMIT_GN_STATS = saved
    return out


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, in its own dtype)."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    from safetensors.torch import save_file

    tensors = record()
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(GOLDEN_PATH), metadata={k: digest(v) for k, v in tensors.items()})
    for k, v in tensors.items():
        print(k, tuple(v.shape), digest(v)[:16])
