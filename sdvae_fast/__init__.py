"""sdvae-fast: Triton kernels and a drop-in diffusers `AutoencoderKL` for the Stable Diffusion VAE.

    from sdvae_fast import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("path/to/vae")         # or from_single_file(...), from_preset("sdxl")
    z = vae.encode(images).latent_dist.sample()               # images (N, 3, H, W) in [-1, 1]
    images = vae.decode(z).sample                             # (N, 3, 8h, 8w)

`patch` / `unpatch` (switch diffusers' own AutoencoderKL to the fast path) are imported on first use, so
`import sdvae_fast` stays light (no diffusers, no Triton kernels).
"""
from sdvae_fast.configs import PRESETS, resolve_config
from sdvae_fast.model import AutoencoderKL, AutoencoderKLOutput, DecoderOutput
from sdvae_fast.reference import DiagonalGaussianDistribution

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "PRESETS",
    "resolve_config",
    "patch",
    "unpatch",
    "is_patched",
]

_LAZY = {"patch": "sdvae_fast.patching", "unpatch": "sdvae_fast.patching", "is_patched": "sdvae_fast.patching"}


def __getattr__(name: str):
    """Import `patch` / `unpatch` (and `is_patched`) from `sdvae_fast.patching` on first access."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        globals().update({attr: getattr(module, attr) for attr in _LAZY})
        return globals()[name]
    raise AttributeError(f"module 'sdvae_fast' has no attribute {name!r}")
