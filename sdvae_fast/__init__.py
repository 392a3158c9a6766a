"""sdvae-fast: Triton kernels and a drop-in diffusers `AutoencoderKL` for the Stable Diffusion VAE.

    from sdvae_fast import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("path/to/vae")         # or from_single_file(...), from_preset("sdxl")
    z = vae.encode(images).latent_dist.sample()               # images (N, 3, H, W) in [-1, 1]
    images = vae.decode(z).sample                             # (N, 3, 8h, 8w)

With diffusers installed, `AutoencoderKL` is a subclass of `diffusers.AutoencoderKL` and `DecoderOutput` /
`AutoencoderKLOutput` are diffusers' classes; without it, the standalone implementation (`sdvae_fast.model`).
Every public name is imported on first use, so `import sdvae_fast` stays light (no diffusers, no Triton).
"""
import importlib

__all__ = [
    "AutoencoderKL",
    "ConsistencyDecoderVAE",
    "AutoencoderKLFlux2",
    "VQModel",
    "StandaloneAutoencoderKL",
    "AutoencoderKLOutput",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "PRESETS",
    "resolve_config",
    "load_vae",
    "patch",
    "unpatch",
    "is_patched",
    "enable_patch_parallel",
    "disable_patch_parallel",
]

# Public name -> the module that defines it.
_LAZY = {
    "AutoencoderKL": "sdvae_fast.model",
    "ConsistencyDecoderVAE": "sdvae_fast.consistency",
    "AutoencoderKLFlux2": "sdvae_fast.flux2",
    "VQModel": "sdvae_fast.vq",
    "StandaloneAutoencoderKL": "sdvae_fast.model",
    "AutoencoderKLOutput": "sdvae_fast.model",
    "DecoderOutput": "sdvae_fast.model",
    "HAS_DIFFUSERS": "sdvae_fast.model",
    "DiagonalGaussianDistribution": "sdvae_fast.model",
    "PRESETS": "sdvae_fast.configs",
    "resolve_config": "sdvae_fast.configs",
    "load_vae": "sdvae_fast.loading",
    "patch": "sdvae_fast.patching",
    "unpatch": "sdvae_fast.patching",
    "is_patched": "sdvae_fast.patching",
    "enable_patch_parallel": "sdvae_fast.patching",
    "disable_patch_parallel": "sdvae_fast.patching",
}


def __getattr__(name: str):
    """Import a public name from its module (`_LAZY`) on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdvae_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
