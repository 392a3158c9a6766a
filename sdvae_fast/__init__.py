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
]

_LAZY = {"patch": "sdvae_fast.patch", "unpatch": "sdvae_fast.patch"}


def __getattr__(name: str):
    """Import `patch` / `unpatch` from `sdvae_fast.patch` on first access.

    Importing the submodule binds the package attribute `patch` to the module object, so the functions are bound
    over it here (`sdvae_fast.patch` then is the function; `sys.modules["sdvae_fast.patch"]` stays the module).
    """
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        globals().update({attr: getattr(module, attr) for attr in _LAZY})
        return globals()[name]
    raise AttributeError(f"module 'sdvae_fast' has no attribute {name!r}")
